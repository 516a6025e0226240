"""Real-size InstructBLIP-Vicuna-7B and DeepSeek-VL2-Small configs exercised abstractly: parameter counts equal
transformers' meta-device models (DeepSeek-VL2: transformers SigLIP + DeepseekV2 + the official projector and
newline/separator vectors), forward shapes with jax.eval_shape. Fixture provenance is in each file."""

import json
import math
import os

import jax
import jax.numpy as jnp
import torch

from models import deepseek_vl2, instructblip

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "configs")


def abstract(shapes, dtype=jnp.bfloat16):
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dtype), shapes,
                      is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(v, int) for v in x))


def count(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def test_instructblip_vicuna_7b():
  from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration

  raw = json.load(open(os.path.join(FIXTURES, "instructblip-vicuna-7b.json")))
  config = instructblip.config_from_dict(raw)
  params = abstract(instructblip.param_shapes(config))
  with torch.device("meta"):
    ref = InstructBlipForConditionalGeneration(InstructBlipConfig(**{k: v for k, v in raw.items() if k[0] != "_"}))
  assert count(params) == sum(p.numel() for p in ref.parameters())
  assert config.dims.num_hidden_layers == 32 and config.num_query_tokens == 32
  ids = jnp.concatenate([jnp.full((1, 32), config.image_token_id), jnp.ones((1, 9), jnp.int32)], 1)
  out = jax.eval_shape(
      lambda p, x, q: instructblip.forward(p, config, ids, x, qformer_input_ids=q), params,
      jax.ShapeDtypeStruct((1, 3, 224, 224), jnp.float32), jax.ShapeDtypeStruct((1, 7), jnp.int32))
  assert out["logits"].shape == (1, 41, 32002)


def test_deepseek_vl2_small():
  from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

  raw = json.load(open(os.path.join(FIXTURES, "deepseek-vl2-small.json")))
  config = deepseek_vl2.config_from_dict(raw)
  params = abstract(deepseek_vl2.param_shapes(config))
  lang = {k: v for k, v in raw["language_config"].items() if k not in ("use_mla", "scoring_func", "architectures")}
  v = config.vision
  with torch.device("meta"):
    ref_lm = DeepseekV2ForCausalLM(DeepseekV2Config(**lang))
    ref_vision = SiglipVisionModel(SiglipVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_hidden_layers,
        num_attention_heads=v.num_attention_heads, image_size=v.image_size, patch_size=v.patch_size,
        vision_use_head=False))
  n_proj = sum(o * i + o for o, i in config.projector.linear_shapes())
  want = (sum(p.numel() for p in ref_lm.parameters()) + sum(p.numel() for p in ref_vision.parameters()) + n_proj
          + 2 * config.text.hidden_size)
  assert count(params) == want
  assert config.vision.intermediate_size == 4304 and config.tile_grid == 14
  # One 2x1-tile image: 14*15 + 1 + 14*(28+1) = 617 image tokens.
  crops = [(2, 1)]
  n_img = config.num_image_tokens(*crops[0])
  assert n_img == 617
  ids = jnp.concatenate([jnp.ones((1, 3), jnp.int32), jnp.full((1, n_img), config.image_token_id),
                         jnp.ones((1, 8), jnp.int32)], 1)
  out = jax.eval_shape(lambda p, x: deepseek_vl2.forward(p, config, ids, x, spatial_crops=crops), params,
                       jax.ShapeDtypeStruct((3, 3, 384, 384), jnp.float32))
  assert out["logits"].shape == (1, 628, 102400)


def test_deepseek_vl2_tiny_multi_head_attention_variant():
  """use_mla = False: each layer is transformers' LlamaAttention (the official code imports it) + DeepSeek MoE."""
  from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, LlamaConfig, SiglipVisionConfig, SiglipVisionModel
  from transformers.models.llama.modeling_llama import LlamaAttention

  raw = json.load(open(os.path.join(FIXTURES, "deepseek-vl2-tiny.json")))
  config = deepseek_vl2.config_from_dict(raw)
  t = config.text
  params = abstract(deepseek_vl2.param_shapes(config))
  lang = {k: v for k, v in raw["language_config"].items()
          if k not in ("use_mla", "architectures", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                       "v_head_dim")}
  v = config.vision
  with torch.device("meta"):
    lm = DeepseekV2ForCausalLM(DeepseekV2Config(**lang))
    mha = LlamaAttention(LlamaConfig(hidden_size=t.hidden_size, num_attention_heads=t.num_attention_heads,
                                     num_key_value_heads=t.num_key_value_heads, head_dim=t.head_dim), 0)
    vision = SiglipVisionModel(SiglipVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_hidden_layers,
        num_attention_heads=v.num_attention_heads, image_size=v.image_size, patch_size=v.patch_size,
        vision_use_head=False))
  no_attn = sum(p.numel() for n, p in lm.named_parameters() if ".self_attn." not in n)
  want = (no_attn + t.num_hidden_layers * sum(p.numel() for p in mha.parameters())
          + sum(p.numel() for p in vision.parameters())
          + sum(o * i + o for o, i in config.projector.linear_shapes()) + 2 * t.hidden_size)
  assert count(params) == want
  ids = jnp.concatenate([jnp.ones((1, 2), jnp.int32), jnp.full((1, config.num_image_tokens(1, 1)),
                                                               config.image_token_id)], 1)
  out = jax.eval_shape(lambda p, x: deepseek_vl2.forward(p, config, ids, x, spatial_crops=[(1, 1)],
                                                         output_attentions=True),
                       params, jax.ShapeDtypeStruct((2, 3, 384, 384), jnp.float32))
  assert out["attentions"].shape[:3] == (12, 1, 10)
