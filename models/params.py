"""The LLaVA param tree (transformers names, stacked layers): shapes, and random init for training/tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models.config import LlavaConfig


def param_shapes(config: LlavaConfig) -> dict:
  """The canonical param tree as nested dicts of (shape tuple) leaves, transformers names."""
  v, t = config.vision, config.text
  e, lv = v.hidden_size, v.num_hidden_layers

  def lin(o, i, bias=True, layers=None):
    pre = () if layers is None else (layers,)
    d = {"weight": pre + (o, i)}
    if bias:
      d["bias"] = pre + (o,)
    return d

  def ln(n, layers=None, bias=True):
    pre = () if layers is None else (layers,)
    return {"weight": pre + (n,), "bias": pre + (n,)} if bias else {"weight": pre + (n,)}

  vision = {
      "embeddings": {
          "class_embedding": (e,),
          "patch_embedding": {"weight": (e, v.num_channels, v.patch_size, v.patch_size)},
          "position_embedding": {"weight": (v.num_patches + 1, e)},
      },
      "pre_layrnorm": ln(e),
      "encoder": {"layers": {
          "layer_norm1": ln(e, lv), "layer_norm2": ln(e, lv),
          "self_attn": {k: lin(e, e, True, lv) for k in ("q_proj", "k_proj", "v_proj", "out_proj")},
          "mlp": {"fc1": lin(v.intermediate_size, e, True, lv), "fc2": lin(e, v.intermediate_size, True, lv)},
      }},
      "post_layernorm": ln(e),
  }
  n_feat = e * len(config.feature_layers)
  b = config.multimodal_projector_bias
  projector = {"linear_1": lin(t.hidden_size, n_feat, b), "linear_2": lin(t.hidden_size, t.hidden_size, b)}
  lt, h, d = t.num_hidden_layers, t.hidden_size, t.head_dim
  qo, kvo = t.num_attention_heads * d, t.num_key_value_heads * d
  ab, mb = t.attention_bias, t.mlp_bias
  language = {
      "embed_tokens": {"weight": (t.vocab_size, h)},
      "layers": {
          "input_layernorm": ln(h, lt, bias=False), "post_attention_layernorm": ln(h, lt, bias=False),
          "self_attn": {"q_proj": lin(qo, h, ab, lt), "k_proj": lin(kvo, h, ab, lt), "v_proj": lin(kvo, h, ab, lt),
                        "o_proj": lin(h, qo, ab, lt)},
          "mlp": {"gate_proj": lin(t.intermediate_size, h, mb, lt), "up_proj": lin(t.intermediate_size, h, mb, lt),
                  "down_proj": lin(h, t.intermediate_size, mb, lt)},
      },
      "norm": {"weight": (h,)},
  }
  tree = {"vision_tower": vision, "multi_modal_projector": projector, "language_model": language}
  if not t.tie_word_embeddings:
    tree["lm_head"] = {"weight": (t.vocab_size, h)}
  return tree


def is_shape(x) -> bool:
  """A leaf of a param-shape tree: a tuple of ints (a tuple of sub-trees, e.g. InstructBLIP's Q-Former layers, is
  not one)."""
  return isinstance(x, tuple) and all(isinstance(v, int) for v in x)


def init_params(config: LlavaConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> dict:
  """Random params: N(0, std) matrices and embeddings, ones for norm weights, zeros for biases."""
  shapes = param_shapes(config)
  flat, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=is_shape)
  keys = jax.random.split(key, len(flat))
  leaves = []
  for (path, shape), k in zip(flat, keys):
    names = [p.key for p in path]
    if names[-1] == "bias":
      leaves.append(jnp.zeros(shape, dtype))
    elif any("norm" in n for n in names):
      leaves.append(jnp.ones(shape, dtype))
    else:
      leaves.append((std * jax.random.normal(k, shape)).astype(dtype))
  return jax.tree_util.tree_unflatten(treedef, leaves)


def count_params(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
