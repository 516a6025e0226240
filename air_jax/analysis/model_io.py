"""The one place the analyses touch a model's internals: decoder attention, layer inputs, value norms, W_QK.

Everything else in `air_jax.analysis` works on the arrays these functions return. Decoder attention comes from
any registered family (`models.family.forward`); layer inputs, value norms and W_QK read the decoder's weights
layer by layer and need a plain pre-norm Llama stack (`Family.supports_layer_reuse`: LLaVA-1.5, LLaVA-NeXT with
a Llama decoder); other families get a clear error for those.

Shape legend: L decoder layers, B batch, H query heads, K key/value heads, D head dim, E hidden width,
T sequence length, V vocab.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from models import llama, rope
from models.layers import linear, rms_norm
from models import family as family_lib
from models.llava import positions_from_mask


def text_config(model):
  """The decoder config (sizes: num_hidden_layers, num_attention_heads, head_dim, hidden_size)."""
  return getattr(model.config, "text", model.config)


def lm_params(model) -> dict:
  """The decoder params (embed_tokens, layers stacked over L, norm)."""
  params = getattr(model, "params", model)
  return params["language_model"]


@functools.partial(jax.jit, static_argnames=("config",))
def _attentions(params, config, ids, mask, pixels):
  return family_lib.forward(params, config, ids, pixels, attention_mask=mask, output_attentions=True)["attentions"]


def _require_llama_stack(model) -> None:
  fam = family_lib.family_of(model.config)
  if not fam.supports_layer_reuse(model.config):
    raise ValueError(f"this analysis reads the decoder's weights layer by layer as a plain Llama stack; the "
                     f"{fam.name} family's decoder is not one (attention-based analyses still work)")


def decoder_attentions(model, input_ids, attention_mask=None, pixel_values=None) -> np.ndarray:
  """Post-softmax decoder attention of a full (teacher-forced) forward pass.

  Args:
    model: a LoadedModel (or anything with `.params` and `.config` in its layout).
    input_ids: [B, T] int; image placeholders expanded as the processor does, or one placeholder and no pixels.
    attention_mask: [B, T] (default all ones).
    pixel_values: [I, C, H, W] or None (text only: image placeholders keep their token embedding).

  Returns:
    [L, B, H, T, T] float32 numpy.
  """
  ids = jnp.asarray(input_ids, jnp.int32)
  mask = jnp.ones_like(ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
  pixels = None if pixel_values is None else jax.tree.map(jnp.asarray, pixel_values)
  params = getattr(model, "params", model)
  return np.asarray(_attentions(params, model.config, ids, mask, pixels), np.float32)


@functools.partial(jax.jit, static_argnames=("config",))
def _layer_io(params, config, ids, mask, pixels):
  cfg = config.text
  lm = params["language_model"]
  fam = family_lib.family_of(config)
  embeds = fam.embed(params, config, ids, mask, pixels)
  pos = positions_from_mask(mask)
  ctx = family_lib.context_from_segments(fam.segments(config, ids, mask))
  cos, sin = rope.cos_sin(cfg, pos, embeds.dtype)
  layers = llama.unstack_layers(lm)["layers"]
  x, normed, value_norms = embeds, [], []
  for p in layers:
    y = rms_norm({"weight": jnp.ones_like(p["input_layernorm"]["weight"])}, x, cfg.rms_norm_eps)
    normed.append(y)
    value_norms.append(_value_norms(p, cfg, rms_norm(p["input_layernorm"], x, cfg.rms_norm_eps)))
    x, _, _ = llama._layer(cfg, p, x, cos, sin, ctx, None, None, 0, False, False)  # noqa: SLF001 -- see docstring
  return jnp.stack(normed), jnp.stack(value_norms)


def _value_norms(p, cfg, y):
  """||W_O^h v_j^h|| [B, H, T]: the norm of what key j writes into the residual stream through head h."""
  b, t, _ = y.shape
  h, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
  v = linear(p["self_attn"]["v_proj"], y).reshape(b, t, kv, d)
  v = jnp.repeat(v, h // kv, axis=2)  # query head h reads value head h // G
  wo = p["self_attn"]["o_proj"]["weight"].reshape(-1, h, d)  # [E, H, D]
  out = jnp.einsum("bthd,ehd->bthe", v.astype(jnp.float32), wo.astype(jnp.float32))
  return jnp.linalg.norm(out, axis=-1).transpose(0, 2, 1)


def layer_inputs(model, input_ids, attention_mask=None, pixel_values=None) -> tuple[np.ndarray, np.ndarray]:
  """Per layer: the RMS-normalised input states (before the norm's gain) and the per-head value norms.

  Returns:
    states [L, B, T, E] (what each layer's attention reads, up to its gain) and value_norms [L, B, H, T]
    (||W_O^h v_j^h||, the size of key j's contribution through head h per unit of attention).
  """
  _require_llama_stack(model)
  ids = jnp.asarray(input_ids, jnp.int32)
  mask = jnp.ones_like(ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
  pixels = None if pixel_values is None else jax.tree.map(jnp.asarray, pixel_values)
  params = getattr(model, "params", model)
  states, norms = _layer_io(params, model.config, ids, mask, pixels)
  return np.asarray(states, np.float32), np.asarray(norms, np.float32)


def qk_factors(model, layer: int, fold_norm: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """(a, b) [H, D, E] float64 of one decoder layer with W_QK^h = a[h]^T b[h] (RoPE ignored; see `qk_matrices`).

  Key heads are repeated for the query heads that share them (GQA). Never forms an E x E matrix.
  """
  _require_llama_stack(model)
  cfg = text_config(model)
  lm = lm_params(model)
  att = lm["layers"]["self_attn"]
  h, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
  a = np.asarray(att["q_proj"]["weight"][layer], np.float64).reshape(h, d, -1)
  b = np.repeat(np.asarray(att["k_proj"]["weight"][layer], np.float64).reshape(kv, d, -1), h // kv, axis=0)
  if fold_norm:
    g = np.asarray(lm["layers"]["input_layernorm"]["weight"][layer], np.float64)
    a, b = a * g, b * g
  return a, b


def qk_matrices(model, fold_norm: bool = True) -> np.ndarray:
  """Per-head query-key matrices W_QK = W_Q^h^T W_K^h of the decoder, [L, H, E, E] float64 (RoPE ignored).

  The logit of query state x_i and key state x_j in head h is x_i^T W_QK x_j / sqrt(D) (before RoPE). With
  fold_norm, W_QK acts on RMS-normalised states: the input norm's gain g is folded in (diag(g) W_QK diag(g)).
  L x H x E x E: small models only (a 7B model would need 137 GB); use `qk_factors` for large ones.
  """
  _require_llama_stack(model)
  cfg = text_config(model)
  lm = lm_params(model)
  att = lm["layers"]["self_attn"]
  h, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
  wq = np.asarray(att["q_proj"]["weight"], np.float64).reshape(cfg.num_hidden_layers, h, d, -1)
  wk = np.asarray(att["k_proj"]["weight"], np.float64).reshape(cfg.num_hidden_layers, kv, d, -1)
  wk = np.repeat(wk, h // kv, axis=1)
  if fold_norm:
    g = np.asarray(lm["layers"]["input_layernorm"]["weight"], np.float64)[:, None, None, :]
    wq, wk = wq * g, wk * g
  return np.einsum("lhde,lhdf->lhef", wq, wk)


__all__ = ["decoder_attentions", "layer_inputs", "lm_params", "qk_factors", "qk_matrices", "text_config"]
