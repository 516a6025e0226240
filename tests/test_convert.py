"""Checkpoint conversion: the three key layouts, sharding, clear errors, pickle refusal, orbax round trip."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

import air_jax
from convert.orbax_io import restore_params, save_params
from convert.safetensors_io import read_safetensors


def _as_layout(key: str, layout: str) -> str:
  """Rewrites a transformers-5.x key into another layout."""
  if layout == "5.x":
    return key
  if layout == "legacy":
    return key.replace("vision_tower.", "vision_tower.vision_model.", 1) if key.startswith("vision_tower.") else key
  if layout == "4.5x":
    if key.startswith("vision_tower."):
      return "model.vision_tower.vision_model." + key[len("vision_tower."):]
    if key.startswith("language_model.model."):
      return "model.language_model." + key[len("language_model.model."):]
    if key == "language_model.lm_head.weight":
      return "lm_head.weight"
    return "model." + key
  raise ValueError(layout)


def _copy_with(src: str, dst: str, tensors: dict) -> None:
  os.makedirs(dst, exist_ok=True)
  for name in os.listdir(src):
    if not name.endswith(".safetensors"):
      shutil.copy(os.path.join(src, name), dst)
  save_file(tensors, os.path.join(dst, "model.safetensors"))


@pytest.fixture(scope="module")
def tensors(tiny_dir):
  return read_safetensors(os.path.join(tiny_dir, "model.safetensors"))


@pytest.fixture(scope="module")
def reference(tiny_model):
  return jax.tree.map(np.asarray, tiny_model.params)


@pytest.mark.parametrize("layout", ["legacy", "4.5x", "5.x"])
def test_each_layout_loads_identically(layout, tiny_dir, tensors, reference, tmp_path):
  renamed = {_as_layout(k, layout): v for k, v in tensors.items()}
  assert layout == "5.x" or set(renamed) != set(tensors)
  _copy_with(tiny_dir, str(tmp_path), renamed)
  loaded = air_jax.load_pretrained(str(tmp_path), with_processor=False)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, loaded.params), reference)


def test_sharded_checkpoint_loads(tiny_dir, tensors, reference, tmp_path):
  keys = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
            "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
  for name in os.listdir(tiny_dir):
    if not name.endswith(".safetensors"):
      shutil.copy(os.path.join(tiny_dir, name), tmp_path)
  for file, ks in shards.items():
    save_file({k: tensors[k] for k in ks}, str(tmp_path / file))
  index = {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
  loaded = air_jax.load_pretrained(str(tmp_path), with_processor=False)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, loaded.params), reference)


def test_missing_extra_and_misshaped_keys_are_listed(tiny_dir, tensors, tmp_path):
  bad = dict(tensors)
  del bad["language_model.model.layers.1.mlp.up_proj.weight"]
  del bad["multi_modal_projector.linear_2.bias"]
  bad["language_model.model.layers.0.extra_thing.weight"] = np.zeros(3, np.float32)
  bad["something_else.weight"] = np.zeros(3, np.float32)
  bad["vision_tower.post_layernorm.weight"] = np.zeros(7, np.float32)
  _copy_with(tiny_dir, str(tmp_path), bad)
  with pytest.raises(ValueError) as e:
    air_jax.load_pretrained(str(tmp_path), with_processor=False)
  msg = str(e.value)
  assert "language_model.layers.mlp.up_proj.weight (layers [1])" in msg
  assert "multi_modal_projector.linear_2.bias" in msg
  assert "language_model.model.layers.0.extra_thing.weight" in msg and "something_else.weight" in msg
  assert "vision_tower.post_layernorm.weight: checkpoint (7,) vs expected (32,)" in msg


def test_a_parameter_filled_twice_is_named(tiny_dir, tensors, tmp_path):
  """One tensor under two layouts' names, or one key in two shards: refused, naming both, never silently dropped."""
  alias = dict(tensors, **{"model.language_model.norm.weight": tensors["language_model.model.norm.weight"] * 2})
  _copy_with(tiny_dir, str(tmp_path / "alias"), alias)
  with pytest.raises(ValueError, match=r"filled twice.*model\.language_model\.norm\.weight \(model\.safetensors\) "
                                       r"and language_model\.model\.norm\.weight"):
    air_jax.load_pretrained(str(tmp_path / "alias"), with_processor=False)
  shards = tmp_path / "shards"
  _copy_with(tiny_dir, str(shards), tensors)
  os.rename(shards / "model.safetensors", shards / "model-00001-of-00002.safetensors")
  key = "language_model.lm_head.weight"
  save_file({key: tensors[key] + 1}, str(shards / "model-00002-of-00002.safetensors"))
  with pytest.raises(ValueError, match="both fill lm_head.weight"):
    air_jax.load_pretrained(str(shards), with_processor=False)


def test_tree_filler_refuses_overlapping_writes():
  """Per-family converters (InstructBLIP, DeepSeek-VL2): a whole-leaf write and a per-row write of one leaf (e.g.
  fused and per-expert weights of one layer), or one row written twice, are named."""
  from convert.tree_fill import TreeFiller

  shapes = {"layers": {"w": (2, 3, 4)}, "b": (4,)}
  f = TreeFiller(shapes, np.float32, "ckpt")
  assert f.set("k0", "layers.0.w", np.ones((3, 4)))
  assert f.set("k1", "layers.1.w", np.ones((3, 4)))
  assert f.set("b", "b", np.ones(4))
  assert not f.set("k0 again", "layers.0.w", np.zeros((3, 4)))
  assert not f.set("fused", "layers.w", np.zeros((2, 3, 4)))
  assert not f.set("b2", "b", np.zeros(4))
  with pytest.raises(ValueError, match=r"filled twice \(3;.*k0 again and k0 both fill layers\.w rows \[0\]"):
    f.finish()
  g = TreeFiller(shapes, np.float32, "ckpt")
  assert g.set("fused", "layers.w", np.ones((2, 3, 4))) and g.set("b", "b", np.ones(4))
  assert not g.set("row", "layers.1.w", np.zeros((3, 4)))
  with pytest.raises(ValueError, match="row and fused both fill layers.w rows"):
    g.finish()


def test_pickle_checkpoint_is_refused(tiny_dir, tmp_path):
  shutil.copy(os.path.join(tiny_dir, "config.json"), tmp_path)
  # Never unpickled: the loader must refuse on the file name alone, so any bytes will do.
  (tmp_path / "pytorch_model.bin").write_bytes(b"not really a pickle")
  with pytest.raises(ValueError, match="pickle-format weights \\(pytorch_model.bin\\)"):
    air_jax.load_pretrained(str(tmp_path), with_processor=False)


def test_bad_config_names_the_field(tiny_dir, tmp_path):
  cfg = json.load(open(os.path.join(tiny_dir, "config.json")))
  cfg["vision_feature_select_strategy"] = "middle"
  _copy_with(tiny_dir, str(tmp_path), read_safetensors(os.path.join(tiny_dir, "model.safetensors")))
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match="vision_feature_select_strategy.*'middle'"):
    air_jax.load_pretrained(str(tmp_path), with_processor=False)


def test_orbax_round_trip(tiny_model, reference, tmp_path):
  save_params(str(tmp_path / "ckpt"), tiny_model.params)
  restored = restore_params(str(tmp_path / "ckpt"), like=tiny_model.params)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, restored), reference)


def _logits(model, inputs):
  from models import family

  out = family.forward(model.params, model.config, inputs["input_ids"].numpy(), inputs["pixel_values"].numpy(),
                       attention_mask=inputs["attention_mask"].numpy())
  return np.asarray(out["logits"])


def test_tied_head_follows_the_checkpoint_as_transformers_does(tiny_dir, tensors, tmp_path, caplog):
  """A tied config with a stored, different lm_head is loaded untied (transformers keeps the head and warns);
  a tied flag at either level with no stored head ties it. Both equal transformers' logits."""
  import torch
  from transformers import LlavaForConditionalGeneration

  from models.config import tied_flag
  from tests.conftest import PROMPTS, hf_inputs
  from tests.tiny import random_images

  def variant(name, top, text, drop_head):
    path = str(tmp_path / name)
    kept = {k: v for k, v in tensors.items() if not (drop_head and k.endswith("lm_head.weight"))}
    _copy_with(tiny_dir, path, kept)
    with open(os.path.join(path, "config.json")) as f:
      cfg = json.load(f)
    cfg["tie_word_embeddings"], cfg["text_config"]["tie_word_embeddings"] = top, text
    with open(os.path.join(path, "config.json"), "w") as f:
      json.dump(cfg, f)
    return path

  assert any(k.endswith("lm_head.weight") for k in tensors)  # the fixture's head is stored (untied model)
  cases = {"stored_top": (True, False, False), "stored_text": (False, True, False),
           "tied_top": (True, False, True), "tied_text": (False, True, True)}
  for name, (top, text, drop_head) in cases.items():
    path = variant(name, top, text, drop_head)
    caplog.clear()
    model = air_jax.load_pretrained(path)
    assert model.config.text.tie_word_embeddings == drop_head, name
    assert ("it is used as stored (untied)" in caplog.text) == (not drop_head), name
    ref = LlavaForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()
    if name == "tied_text":  # transformers 5 reads LLaVA's top-level flag OR the text config's: tied as well
      assert ref.config.tie_word_embeddings
    inputs = hf_inputs(model.processor, random_images(2, 28, seed=3), PROMPTS)
    with torch.no_grad():
      want = ref(**inputs).logits.numpy()
    mask = inputs["attention_mask"].numpy().astype(bool)
    np.testing.assert_allclose(_logits(model, inputs)[mask], want[mask], atol=1e-5, rtol=1e-5, err_msg=name)
  assert tied_flag({"tie_word_embeddings": False, "text_config": {"tie_word_embeddings": True}})
  assert not tied_flag({"text_config": {}})


def test_qwen_text_defaults_are_transformers_config_defaults():
  """Fields a config.json leaves out take the transformers config class's defaults (rope theta, RMSNorm eps)."""
  from transformers import Qwen2Config, Qwen3Config
  from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig

  from models.qwen_text import qwen_text_config_from_dict

  for model_type, cls in (("qwen2", Qwen2Config), ("qwen3", Qwen3Config), ("qwen2_5_vl_text", Qwen2_5_VLTextConfig)):
    ref = cls()
    ours = qwen_text_config_from_dict({"model_type": model_type, "hidden_size": 64, "num_attention_heads": 4})
    theta = (ref.rope_parameters or {}).get("rope_theta", getattr(ref, "rope_theta", None))
    assert ours.rope.rope_theta == theta and ours.rms_norm_eps == ref.rms_norm_eps, model_type


def test_mistral_ignores_bias_flags_as_transformers_does():
  """transformers' Mistral layers have no biases whatever `attention_bias` / `mlp_bias` say; Llama reads them."""
  from models.config import text_config_from_dict

  flags = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4, "attention_bias": True,
           "mlp_bias": True}
  mistral = text_config_from_dict({"model_type": "mistral", **flags})
  llama = text_config_from_dict({"model_type": "llama", **flags})
  assert not mistral.attention_bias and not mistral.mlp_bias
  assert llama.attention_bias and llama.mlp_bias
