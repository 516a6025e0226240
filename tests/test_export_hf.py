"""Export of air-jax params to a Hugging Face LLaVA directory: exact reload, transformers parity, clear errors."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import air_jax
from convert.export_hf import checkpoint_tensors, config_dict, export_hf
from convert.safetensors_io import read_safetensors
from models import llava
from models.config import LlavaConfig, RopeConfig, TextConfig, VisionConfig, load_llava_config
from models.params import init_params

VOCAB = 50
IMAGE_TOKEN = 49


def _config(tie: bool = False, feature_layer=-2, rope: RopeConfig = RopeConfig(), kv: int = 2) -> LlavaConfig:
  vision = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                        image_size=16, patch_size=8, hidden_act="quick_gelu")
  text = TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=kv, head_dim=16, rms_norm_eps=1e-6,
                    max_position_embeddings=64, tie_word_embeddings=tie, rope=rope, bos_token_id=1,
                    eos_token_id=(2,), pad_token_id=3)
  return LlavaConfig(vision=vision, text=text, image_token_id=IMAGE_TOKEN, vision_feature_layer=feature_layer)


def _params(config: LlavaConfig, seed: int = 0) -> dict:
  # A larger std than training init so attention patterns are far from uniform (a stronger parity check).
  params = init_params(config, jax.random.PRNGKey(seed), std=0.1)
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
  # Non-trivial norms and biases too, so a swapped or dropped one cannot go unnoticed.
  leaves = [x + 0.05 * jax.random.normal(k, x.shape) if x.ndim == 1 or x.ndim == 2 and x.shape[0] < 4 else x
            for x, k in zip(leaves, keys)]
  return jax.tree_util.tree_unflatten(treedef, leaves)


def _inputs(config: LlavaConfig, batch: int = 2):
  rng = np.random.default_rng(0)
  p = config.num_image_tokens
  ids = np.concatenate([np.ones((batch, 1)), rng.integers(4, IMAGE_TOKEN, (batch, 3)),
                        np.full((batch, p), IMAGE_TOKEN), rng.integers(4, IMAGE_TOKEN, (batch, 6))], axis=1)
  pixels = rng.normal(size=(batch, 3, config.vision.image_size, config.vision.image_size)).astype(np.float32)
  return ids.astype(np.int32), pixels


CASES = {
  "default": {},
  "tied_linear_rope_full_feature": dict(tie=True, feature_layer=-1, kv=4,
                                        rope=RopeConfig(rope_type="linear", rope_theta=5000.0, factor=2.0)),
  "multi_layer_feature": dict(feature_layer=(-3, -1)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_roundtrip_and_transformers_parity(case, tmp_path):
  import torch
  from transformers import LlavaForConditionalGeneration

  config = _config(**CASES[case])
  params = _params(config)
  export_hf(params, config, tmp_path)
  assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
  # Our loader: same config, bit-identical params.
  assert load_llava_config(str(tmp_path)) == config
  loaded = air_jax.load_pretrained(str(tmp_path), with_processor=False)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, loaded.params),
               jax.tree.map(np.asarray, params))
  keys = set(read_safetensors(str(tmp_path / "model.safetensors")))
  assert ("language_model.lm_head.weight" in keys) == (not config.text.tie_word_embeddings)
  assert "language_model.model.layers.1.self_attn.q_proj.weight" in keys
  assert "vision_tower.encoder.layers.2.mlp.fc1.bias" in keys
  assert not any(".layers." not in k and "layers" in k.split(".") for k in keys)  # every layer unstacked
  # transformers (eager attention) gives the same logits as our forward.
  ids, pixels = _inputs(config)
  ours = np.asarray(llava.forward(params, config, jnp.asarray(ids), jnp.asarray(pixels))["logits"])
  model = LlavaForConditionalGeneration.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
  with torch.no_grad():
    theirs = model(input_ids=torch.tensor(ids, dtype=torch.long), pixel_values=torch.tensor(pixels)).logits.numpy()
  assert ours.shape == theirs.shape == (2, ids.shape[1], VOCAB)
  np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
  assert np.abs(ours).max() > 0.1  # not a degenerate model


def test_config_dict_fields():
  config = _config()
  d = config_dict(config)
  assert d["model_type"] == "llava" and d["architectures"] == ["LlavaForConditionalGeneration"]
  assert d["image_token_index"] == IMAGE_TOKEN and d["image_seq_length"] == 4
  assert d["text_config"]["eos_token_id"] == 2 and d["text_config"]["rope_parameters"]["rope_type"] == "default"
  two_eos = dataclasses.replace(config, text=dataclasses.replace(config.text, eos_token_id=(2, 5)))
  assert config_dict(two_eos)["text_config"]["eos_token_id"] == [2, 5]
  json.dumps(d)  # serialisable


def test_export_is_byte_reproducible(tmp_path):
  config = _config()
  params = _params(config)
  export_hf(params, config, tmp_path / "a")
  export_hf(jax.tree.map(np.asarray, params), config, tmp_path / "b")
  for name in ("config.json", "model.safetensors"):
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_mismatched_params_are_named(tmp_path):
  config = _config()
  params = _params(config)
  bad = jax.tree.map(lambda x: x, params)
  bad["multi_modal_projector"]["linear_1"]["weight"] = np.zeros((3, 3), np.float32)
  del bad["language_model"]["norm"]
  with pytest.raises(ValueError, match=r"language_model\.norm\.weight.*multi_modal_projector\.linear_1\.weight"):
    checkpoint_tensors(bad, config)
  with pytest.raises(ValueError, match="shape mismatches"):
    export_hf(bad, config, tmp_path)
  assert not os.path.exists(tmp_path / "model.safetensors")
  with pytest.raises(ValueError, match="dtype must be one of"):
    export_hf(params, config, tmp_path, dtype="int8")
