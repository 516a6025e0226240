"""Real Qwen2.5-VL-7B-Instruct and InternVL3_5-8B-HF configs, abstractly: parameter counts equal transformers'
meta-device models, and a forward pass has the expected shapes (jax.eval_shape, nothing allocated)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import torch

from models import internvl, qwen2_5_vl
from models.params import count_params

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "configs")


def _raw(name):
  with open(os.path.join(FIXTURES, name)) as f:
    return json.load(f)


def _abstract(shapes):
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.bfloat16), shapes, is_leaf=lambda x: isinstance(x, tuple))


def test_qwen2_5_vl_7b_param_count_and_shapes():
  from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

  raw = _raw("Qwen2.5-VL-7B-Instruct.json")
  config = qwen2_5_vl.config_from_dict(raw)
  assert config.text.mrope_section == (16, 24, 24) and config.text.qkv_bias and config.text.rope.rope_theta == 1e6
  params = _abstract(qwen2_5_vl.param_shapes(config))
  with torch.device("meta"):
    ref = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**raw))
  assert count_params(params) == sum(p.numel() for p in ref.parameters())
  assert count_params(params) == 8_292_166_656  # the published safetensors total of Qwen2.5-VL-7B-Instruct
  grid = np.array([[1, 28, 36]])  # a 392 x 504 image: 252 merged tokens
  ids = np.concatenate([np.full((1, 5), 1), np.full((1, 252), config.image_token_id), np.full((1, 7), 1)], 1)
  pixels = np.zeros((28 * 36, 1176), np.float32)
  out = jax.eval_shape(lambda p: qwen2_5_vl.forward(p, config, ids, pixels, grid), params)
  assert out["logits"].shape == (1, 264, 152064)


def test_internvl3_5_8b_param_count_and_shapes():
  from transformers import InternVLConfig, InternVLForConditionalGeneration

  raw = _raw("InternVL3_5-8B-HF.json")
  config = internvl.config_from_dict(raw)
  assert config.text.qk_norm and not config.text.qkv_bias and config.tokens_per_tile == 256
  params = _abstract(internvl.param_shapes(config))
  # The real checkpoint stores lm_head and text_config says untied; transformers' top-level default (tied) then
  # keeps the stored head with a warning. The meta model is built untied, as the loaded model is.
  assert not config.text.tie_word_embeddings
  with torch.device("meta"):
    ref = InternVLForConditionalGeneration(InternVLConfig(**dict(raw, tie_word_embeddings=False)))
  assert count_params(params) == sum(p.numel() for p in ref.parameters()) == 8_528_318_464  # card: 8.5B
  ids = np.concatenate([np.full((1, 5), 1), np.full((1, 2 * 256), config.image_token_id), np.full((1, 7), 1)], 1)
  pixels = np.zeros((2, 3, 448, 448), np.float32)
  out = jax.eval_shape(lambda p: internvl.forward(p, config, ids, pixels), params)
  assert out["logits"].shape == (1, 524, 151936)


def test_internvl3_5_30b_a3b_param_count_and_shapes():
  """The Qwen3-MoE variant. The fixture is InternVL3_5-8B-HF's vision / projector fields (the same InternViT-300M)
  with Qwen3-30B-A3B's published config.json as text_config (48 layers, 128 experts of width 768, top-8,
  norm_topk_prob true): every layer sparse, so the layers stay stacked."""
  from transformers import InternVLConfig, InternVLForConditionalGeneration

  raw = _raw("InternVL3_5-30B-A3B-HF.json")
  config = internvl.config_from_dict(raw)
  t = config.text
  assert t.moe.num_experts == 128 and t.moe.num_experts_per_tok == 8 and t.moe.norm_topk_prob
  assert t.sparse_layers == tuple(range(48)) and not t.mixed_layers and t.moe_intermediate_size == 768
  params = _abstract(internvl.param_shapes(config))
  with torch.device("meta"):
    ref = InternVLForConditionalGeneration(InternVLConfig(**dict(raw, tie_word_embeddings=False)))
  n = sum(p.numel() for p in ref.parameters())
  assert count_params(params) == n
  assert 30.5e9 < n < 31.5e9  # card: 30.5B (InternViT-300M + Qwen3-30B-A3B)
  ids = np.concatenate([np.full((1, 5), 1), np.full((1, 256), config.image_token_id), np.full((1, 7), 1)], 1)
  pixels = np.zeros((1, 3, 448, 448), np.float32)
  out = jax.eval_shape(lambda p: internvl.forward(p, config, ids, pixels), params)
  assert out["logits"].shape == (1, 268, 151936)
