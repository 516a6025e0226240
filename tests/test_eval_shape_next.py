"""Real LLaVA-NeXT configs (v1.6 Vicuna-7B, Mistral-7B, 34B) exercised abstractly: parameter counts equal
transformers' meta-device models; forward shapes with a 5-tile anyres image."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from models import family, llava, llava_next

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "configs")
NAMES = ["llava-v1.6-vicuna-7b-hf", "llava-v1.6-mistral-7b-hf", "llava-v1.6-34b-hf"]


def _config(name):
  raw = json.load(open(os.path.join(FIXTURES, f"{name}.json")))
  fam = family.family_for_config_dict(raw)
  return raw, fam, fam.parse_config(raw)


def _abstract_params(fam, config):
  shapes = fam.param_shapes(config)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.bfloat16), shapes, is_leaf=lambda x: isinstance(x, tuple))


@pytest.mark.parametrize("name", NAMES)
def test_param_count_matches_transformers_meta_model(name):
  from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

  raw, fam, config = _config(name)
  assert fam.name == "llava_next"
  ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(_abstract_params(fam, config)))
  with torch.device("meta"):
    ref = LlavaNextForConditionalGeneration(LlavaNextConfig(**raw))
  assert ours == sum(p.numel() for p in ref.parameters())
  dims = config.dims
  expected = {"llava-v1.6-vicuna-7b-hf": (32, 32, 32), "llava-v1.6-mistral-7b-hf": (32, 32, 8),
              "llava-v1.6-34b-hf": (60, 56, 8)}[name]
  assert (dims.num_hidden_layers, dims.num_attention_heads, dims.num_key_value_heads) == expected
  assert config.text.sliding_window is None  # the published Mistral config sets it to null


def test_forward_shapes_on_the_34b_config_with_five_tiles():
  _, fam, config = _config("llava-v1.6-34b-hf")
  size = (700, 1000)  # -> the 672 x 672 pinpoint: 2 x 2 tiles + the base tile
  assert llava_next.num_tiles(config, size) == 5
  n_img = llava_next.num_image_tokens(config, size)
  ids = np.concatenate([np.ones((1, 5)), np.full((1, n_img), config.image_token_id), np.ones((1, 9))], 1)
  ids = jnp.asarray(ids, jnp.int32)
  vision = {"pixel_values": jax.ShapeDtypeStruct((1, 5, 3, 336, 336), jnp.float32),
            "image_rows": jax.ShapeDtypeStruct((1, n_img), jnp.int32)}
  out = jax.eval_shape(lambda p, v: llava.forward(p, config, ids, v), _abstract_params(fam, config), vision)
  assert out["logits"].shape == (1, ids.shape[1], 64064)
