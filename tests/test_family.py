"""The family registry: config.json -> family, DecoderDims, the family-agnostic loader and forward."""

import json
import os
import shutil

import numpy as np
import pytest

from air_jax.loading import load_config
from convert.checkpoint import index_checkpoint
from models import family
from models.config import LlavaConfig

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "configs")


def test_registry_picks_the_family_by_model_type_then_architectures():
  raw = json.load(open(os.path.join(FIXTURES, "llava-1.5-7b-hf.json")))
  assert family.family_for_config_dict(raw).name == "llava"
  by_arch = dict(raw, model_type="my_llava_fork")
  assert family.family_for_config_dict(by_arch).name == "llava"
  with pytest.raises(ValueError, match="model_type 'qwen9_vl'.*supported model_type"):
    family.family_for_config_dict({"model_type": "qwen9_vl", "architectures": ["Nope"]}, "x/config.json")
  names = {f.name for f in family.families()}
  assert {"llava", "llava_next"} <= names


def test_config_exposes_decoder_dims():
  raw = json.load(open(os.path.join(FIXTURES, "llava-1.5-7b-hf.json")))
  config = family.family_for_config_dict(raw).parse_config(raw)
  assert isinstance(config, LlavaConfig) and family.family_of(config).name == "llava"
  d = family.dims(config)
  assert (d.num_hidden_layers, d.num_attention_heads, d.num_key_value_heads, d.head_dim, d.vocab_size) == (
      32, 32, 32, 128, 32064)
  hash(config)  # static jit argument


def test_load_config_names_the_file_on_bad_values(tmp_path):
  raw = json.load(open(os.path.join(FIXTURES, "llava-1.5-7b-hf.json")))
  raw["text_config"]["model_type"] = "gpt2"
  (tmp_path / "config.json").write_text(json.dumps(raw))
  with pytest.raises(ValueError, match=r"config.json.*text_config.model_type.*'gpt2'"):
    load_config(str(tmp_path))


def test_loader_reports_unused_and_unfilled_keys(tiny_dir, tmp_path):
  from safetensors.numpy import load_file, save_file

  config, fam = load_config(tiny_dir)
  shapes, sources = index_checkpoint(tiny_dir, config)
  assert set(sources) and all(v for v in sources.values())
  for f in os.listdir(tiny_dir):
    if not f.endswith(".safetensors"):
      shutil.copy(os.path.join(tiny_dir, f), tmp_path / f)
  tensors = load_file(os.path.join(tiny_dir, "model.safetensors"))
  key = next(k for k in tensors if "layers.1.mlp.up_proj" in k)
  tensors["surprise.weight"] = np.zeros(3, np.float32)
  del tensors[key]
  save_file(tensors, str(tmp_path / "model.safetensors"))
  with pytest.raises(ValueError, match=r"(?s)unused checkpoint keys \(1\).*surprise.weight.*unfilled.*up_proj.*\[1\]"):
    index_checkpoint(str(tmp_path), config)


def test_map_pixels_touches_only_pixels():
  import numpy as np

  fam = family.Family()  # the default (families may override it for their own vision inputs)
  assert fam.map_pixels(None, None, lambda x: x + 1) is None
  np.testing.assert_array_equal(fam.map_pixels(None, np.zeros(2), lambda x: x + 1), np.ones(2))
  v = {"pixel_values": np.zeros(2), "image_rows": np.arange(3)}
  out = fam.map_pixels(None, v, lambda x: x + 1)
  np.testing.assert_array_equal(out["pixel_values"], np.ones(2))
  assert out["image_rows"] is v["image_rows"]
