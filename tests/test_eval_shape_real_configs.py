"""Further released config.json files, abstractly: DeepSeek-VL2 (the 27B MoE: noaux_tc sigmoid routing, fields left
to the official DeepseekV2Config defaults) and Qwen2.5-VL-3B-Instruct (tied head, 4.x flat layout). Parameter counts
equal transformers' meta-device models (DeepSeek-VL2: transformers SigLIP + DeepseekV2 + the official projector,
newline/separator vectors and per-layer e_score_correction_bias)."""

import json
import math
import os

import jax
import jax.numpy as jnp
import torch

from models import deepseek_vl2, qwen2_5_vl

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "configs")


def _raw(name):
  with open(os.path.join(FIXTURES, name)) as f:
    return {k: v for k, v in json.load(f).items() if not k.startswith("_")}


def _abstract(shapes):
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.bfloat16), shapes,
                      is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(v, int) for v in x))


def _count(tree):
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def test_deepseek_vl2_27b_official_defaults_and_count():
  from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

  raw = _raw("deepseek-vl2.json")
  config = deepseek_vl2.config_from_dict(raw)
  t = config.text
  # Absent from language_config: the official DeepseekV2Config defaults (30 layers, 32 heads, MLA 512 / 128 / 64).
  assert (t.num_hidden_layers, t.num_attention_heads, t.kv_lora_rank, t.q_lora_rank) == (30, 32, 512, None)
  assert (t.qk_nope_head_dim, t.qk_rope_head_dim, t.v_head_dim) == (128, 64, 128)
  assert (t.topk_method, t.scoring_func, t.norm_topk_prob, t.routed_scaling_factor) == ("noaux_tc", "sigmoid", True, 2.0)
  assert (t.vocab_size, t.rope.rope_theta, t.rms_norm_eps, t.tie_word_embeddings) == (129280, 10000.0, 1e-6, False)
  assert config.vision.intermediate_size == 4304 and config.projector.n_embed == 2560
  params = _abstract(deepseek_vl2.param_shapes(config))
  lang = {k: v for k, v in raw["language_config"].items()
          if k not in ("scoring_func", "architectures", "auto_map", "topk_method")}
  lang.update(num_hidden_layers=30, num_attention_heads=32, num_key_value_heads=32)
  v = config.vision
  with torch.device("meta"):
    lm = DeepseekV2ForCausalLM(DeepseekV2Config(**lang))
    vis = SiglipVisionModel(SiglipVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_hidden_layers,
        num_attention_heads=v.num_attention_heads, image_size=v.image_size, patch_size=v.patch_size,
        vision_use_head=False))
  n_proj = sum(o * i + o for o, i in config.projector.linear_shapes())
  bias = t.n_routed_experts * (t.num_hidden_layers - t.first_k_dense_replace)
  want = (sum(p.numel() for p in lm.parameters()) + sum(p.numel() for p in vis.parameters()) + n_proj
          + 2 * t.hidden_size + bias)
  assert _count(params) == want == 27_464_895_896
  crops = [(1, 1)]
  n_img = config.num_image_tokens(*crops[0])
  assert n_img == 421
  ids = jnp.concatenate([jnp.ones((1, 3), jnp.int32), jnp.full((1, n_img), config.image_token_id),
                         jnp.ones((1, 8), jnp.int32)], 1)
  out = jax.eval_shape(lambda p, x: deepseek_vl2.forward(p, config, ids, x, spatial_crops=crops), params,
                       jax.ShapeDtypeStruct((2, 3, 384, 384), jnp.float32))
  assert out["logits"].shape == (1, 432, 129280)


def test_qwen2_5_vl_3b_tied_flat_layout():
  from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

  raw = _raw("Qwen2.5-VL-3B-Instruct.json")
  config = qwen2_5_vl.config_from_dict(raw)
  t = config.text
  assert t.tie_word_embeddings and t.mrope_section == (16, 24, 24) and t.rope.rope_theta == 1e6
  assert t.sliding_window is None and t.num_key_value_heads == 2 and t.head_dim == 128
  params = _abstract(qwen2_5_vl.param_shapes(config))
  assert "lm_head" not in params
  with torch.device("meta"):
    ref = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**raw))
  assert _count(params) == sum(p.numel() for p in ref.parameters()) == 3_754_622_976
