"""Bad inputs refused early and clearly: image arrays, truncated safetensors, stale temp files."""

import json
import os
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from air_jax.atomic import atomic_write_json, clean_stale_temps
from air_jax.images import ImageError, array_to_uint8, load_image
from convert.safetensors_io import SafetensorsFile


@pytest.mark.parametrize("arr, words", [
    (np.full((8, 8, 3), np.nan, np.float32), ["NaN", "(8, 8, 3)"]),
    (np.random.RandomState(0).randn(8, 8, 3).astype(np.float32), ["normalised", "min -"]),
    (np.full((8, 8, 3), 0.5, np.float32), ["ambiguous", "max 0.5"]),
    (np.zeros((2, 8, 8, 3), np.uint8), ["batch", "list"]),
    (np.zeros((8, 8, 4), np.uint8), ["[H, W, 3]", "(8, 8, 4)"]),
    (np.zeros((3, 8, 8), np.uint8), ["channels last"]),
    (np.full((8, 8, 3), 300, np.int32), ["[0, 255]", "max 300"]),
    (np.zeros((8, 8, 3), bool), ["dtype bool"]),
    (np.zeros((0, 8, 3), np.uint8), ["empty"]),
    (np.full((8, 8, 3), 256.0), ["above 255"]),
])
def test_bad_image_arrays_are_refused(arr, words):
  with pytest.raises(ImageError) as e:
    array_to_uint8(arr, "image 3")
  assert "image 3" in str(e.value)
  for w in words:
    assert w in str(e.value)


def test_good_image_arrays():
  assert array_to_uint8(np.full((4, 4, 3), 7, np.uint8)).dtype == np.uint8
  out = array_to_uint8(np.full((4, 4, 3), 200.4, np.float32))
  assert out.dtype == np.uint8 and out.max() == 200
  assert array_to_uint8(np.full((4, 4), 9, np.int64)).max() == 9
  assert load_image(np.zeros((5, 6), np.uint8)).size == (6, 5)


def test_unreadable_image_path(tmp_path):
  bad = tmp_path / "x.jpg"
  bad.write_bytes(b"not an image")
  with pytest.raises(ImageError, match="x.jpg"):
    load_image(str(bad))
  with pytest.raises(ImageError, match="not int"):
    load_image(3)


def _write(path, tensors):
  save_file(tensors, str(path))
  return path


def test_truncated_safetensors_names_file_and_tensor(tmp_path):
  p = _write(tmp_path / "model-00002-of-00003.safetensors",
             {"a.weight": np.ones((4, 4), np.float32), "b.weight": np.ones((64, 8), np.float32)})
  data = p.read_bytes()
  p.write_bytes(data[:-100])
  with pytest.raises(ValueError) as e:
    SafetensorsFile(str(p))
  msg = str(e.value)
  assert "model-00002-of-00003.safetensors" in msg and "b.weight" in msg and "truncated" in msg


def test_safetensors_offsets_inconsistent_with_shape(tmp_path):
  p = _write(tmp_path / "m.safetensors", {"w": np.ones((4, 4), np.float32)})
  data = p.read_bytes()
  (n,) = struct.unpack("<Q", data[:8])
  header = json.loads(data[8:8 + n])
  header["w"]["shape"] = [4, 5]
  raw = json.dumps(header).encode()
  raw += b" " * (-len(raw) % 8)
  p.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
  with pytest.raises(ValueError, match=r"tensor 'w'.*\[4, 5\]"):
    SafetensorsFile(str(p))


def test_good_safetensors_still_reads(tmp_path):
  p = _write(tmp_path / "m.safetensors", {"w": np.arange(6, dtype=np.float32).reshape(2, 3)})
  with SafetensorsFile(str(p)) as f:
    np.testing.assert_array_equal(f.get("w"), np.arange(6).reshape(2, 3))


def test_stale_temp_files_are_cleaned(tmp_path):
  target = tmp_path / "results.json"
  dead = tmp_path / ".results.json.999999999.abc.tmp"  # no such pid
  dead.write_text("{partial")
  live = tmp_path / f".results.json.{os.getpid()}.xyz.tmp"  # a concurrent writer: kept
  live.write_text("{")
  other = tmp_path / ".other.json.999999999.abc.tmp"
  other.write_text("{")
  atomic_write_json(target, {"ok": 1})
  assert json.loads(target.read_text()) == {"ok": 1}
  assert not dead.exists() and live.exists() and other.exists()
  assert clean_stale_temps(tmp_path / "other.json") == [str(other)]


@pytest.mark.parametrize("preset", ["air", "adhh", "air_star"])
def test_empty_head_sets_are_refused(tmp_path, preset):
  from air_jax import AIRConfig

  with pytest.raises(ValueError, match="heads is empty"):
    AIRConfig.preset(preset, heads=[])
  f = tmp_path / "heads.json"
  f.write_text(json.dumps({"hal_heads": [], "non_hal_heads": []}))
  with pytest.raises(ValueError, match="heads is empty.*hal_heads"):
    AIRConfig.preset(preset, heads=str(f))


@pytest.fixture(scope="module")
def organism():
  from pathlib import Path

  import air_jax

  return air_jax.load_pretrained(Path(__file__).resolve().parent.parent / "organism" / "checkpoint")


@pytest.mark.parametrize("n", [2.5, "64", True, 0, -3])
def test_max_new_tokens_must_be_a_positive_int(organism, n):
  import air_jax

  with pytest.raises(ValueError, match="max_new_tokens"):
    air_jax.generate(organism, None, np.zeros((64, 64, 3), np.uint8), "describe", max_new_tokens=n)


def test_lengths_beyond_positions_are_refused_before_allocation(organism):
  import air_jax

  limit = organism.config.text.max_position_embeddings
  with pytest.raises(ValueError, match=f"max_position_embeddings \\({limit}\\)"):
    air_jax.generate(organism, None, np.zeros((64, 64, 3), np.uint8), "describe", max_new_tokens=10**9)
  with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings"):
    air_jax.generate(organism, None, np.zeros((64, 64, 3), np.uint8), "word " * (2 * limit), max_new_tokens=4)


def test_cache_memory_check():
  from air_jax.limits import check_lengths
  from models.config import TextConfig

  cfg = TextConfig(max_position_embeddings=10**12)
  with pytest.raises(ValueError, match="KV cache .* GiB"):
    check_lengths(cfg, 64, 1000, 10**8)


def _copy_organism(tmp_path, edit=None, drop=()):
  import shutil
  from pathlib import Path

  src = Path(__file__).resolve().parent.parent / "organism" / "checkpoint"
  dst = tmp_path / "ckpt"
  shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*drop) if drop else None)
  if edit is not None:
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
  return dst


@pytest.mark.parametrize("field, value, words", [
    ("num_attention_heads", 0, ["text_config.num_attention_heads = 0", "positive integer"]),
    ("num_attention_heads", 3, ["not divisible", "num_attention_heads = 3"]),
    ("hidden_size", 12.5, ["text_config.hidden_size = 12.5"]),
    ("num_hidden_layers", -2, ["text_config.num_hidden_layers = -2"]),
    ("num_hidden_layers", 10**9, ["GiB of parameters", "num_hidden_layers"]),
])
def test_bad_config_sizes_are_named_before_allocation(tmp_path, field, value, words):
  import air_jax

  def edit(cfg):
    cfg["text_config"][field] = value

  with pytest.raises(ValueError) as e:
    air_jax.load_pretrained(_copy_organism(tmp_path, edit))
  assert "config.json" in str(e.value)
  for w in words:
    assert w in str(e.value)


def test_bad_vision_config_and_top_level(tmp_path):
  import air_jax

  def edit(cfg):
    cfg["vision_config"]["patch_size"] = 0

  with pytest.raises(ValueError, match="vision_config.patch_size = 0"):
    air_jax.load_pretrained(_copy_organism(tmp_path, edit))
  d = _copy_organism(tmp_path / "b")
  (d / "config.json").write_text("[1, 2]")
  with pytest.raises(ValueError, match="JSON object"):
    air_jax.load_pretrained(d)
  def eps(cfg):
    cfg["text_config"]["rms_norm_eps"] = "x"

  with pytest.raises(ValueError, match=r"config.json: could not convert .* \(field text_config.rms_norm_eps = 'x': "
                                       r"expected a number\)"):
    air_jax.load_pretrained(_copy_organism(tmp_path / "eps", eps))
  for key, value in (("text_config", None), ("vision_config", [1])):
    def sub(cfg, key=key, value=value):
      cfg[key] = value

    with pytest.raises(ValueError, match=f"config.json: {key} must be a JSON object"):
      air_jax.load_pretrained(_copy_organism(tmp_path / key, sub))


def test_missing_tokenizer_is_named_before_weights(tmp_path):
  import air_jax

  d = _copy_organism(tmp_path, drop=("tokenizer.json", "model.safetensors"))
  with pytest.raises(ValueError, match="holds no tokenizer: expected one of tokenizer.json"):
    air_jax.load_pretrained(d)


def test_generation_config_eos_ids(tmp_path):
  from air_jax.generate import eos_token_ids
  from air_jax.loading import generation_eos_ids

  assert generation_eos_ids(str(tmp_path)) == ()
  (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [151645, 151643]}))
  assert generation_eos_ids(str(tmp_path)) == (151645, 151643)
  (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": "x"}))
  with pytest.raises(ValueError, match="generation_config.json: eos_token_id"):
    generation_eos_ids(str(tmp_path))

  class Tok:
    eos_token_id = 7

  class Cfg:
    class dims:
      eos_token_id = (2,)

  assert eos_token_ids(Cfg, Tok, (151643,)) == (2, 7, 151643)


def test_broken_chat_template_is_named(tmp_path):
  import air_jax

  d = _copy_organism(tmp_path)
  (d / "chat_template.jinja").write_text("{% if %}")
  model = air_jax.load_pretrained(d)
  with pytest.raises(ValueError, match="the checkpoint's chat template .* cannot be applied: TemplateSyntaxError"):
    air_jax.generate(model, None, np.zeros((64, 64, 3), np.uint8), "Describe.", max_new_tokens=2)


def test_generation_settings_air_jax_does_not_apply_are_announced(tmp_path, caplog):
  """A checkpoint whose generation_config.json asks transformers for sampling or logits processors: air-jax says at
  load that it decodes as each generate call says; neutral values stay silent."""
  import air_jax

  d = _copy_organism(tmp_path)
  (d / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "do_sample": True,
                                                        "repetition_penalty": 1.05, "num_beams": 1}))
  air_jax.load_pretrained(d, with_processor=False)
  assert "sets do_sample=True, repetition_penalty=1.05, which transformers' generate applies" in caplog.text
  assert "num_beams=" not in caplog.text
  caplog.clear()
  (d / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "repetition_penalty": 1.0}))
  air_jax.load_pretrained(d, with_processor=False)
  assert "transformers' generate applies" not in caplog.text


@pytest.mark.parametrize("kw, match", [
    (dict(temperature=0.0), "temperature must be a number > 0 when sampling, got 0.0"),
    (dict(temperature=-1.0), "temperature must be a number > 0"),
    (dict(temperature=float("nan")), "temperature must be a number > 0"),
    (dict(top_k=-5), "top_k must be an int >= 0 .* got -5"),
    (dict(top_k=2.5), "top_k must be an int"),
    (dict(top_p=1.5), "top_p must be a number in \\[0, 1\\] .* got 1.5"),
    (dict(top_p=-0.5), "top_p must be a number in \\[0, 1\\]"),
])
def test_bad_sampling_settings_are_named(organism, kw, match):
  import air_jax

  img = np.zeros((64, 64, 3), np.uint8)
  with pytest.raises(ValueError, match=match):
    air_jax.generate(organism, None, img, "describe", max_new_tokens=2, do_sample=True, **kw)
  with pytest.raises(ValueError, match=match):
    air_jax.generate_sweep(organism, [air_jax.methods.make("vcd")], img, "describe", max_new_tokens=2,
                           do_sample=True, **kw)


def test_prompts_and_images_per_prompt_are_checked(organism):
  """A prompt holding the image placeholder, a non-string prompt and several images for a one-image family are
  named before anything runs."""
  import air_jax

  img = np.zeros((64, 64, 3), np.uint8)
  with pytest.raises(ValueError, match="prompt 0 contains the image placeholder '<image>'"):
    air_jax.generate(organism, None, img, "<image>\nDescribe.", max_new_tokens=2)
  with pytest.raises(ValueError, match="prompt 1 must be a string, got NoneType"):
    air_jax.generate(organism, None, [img, img], ["describe", None], max_new_tokens=2)
  with pytest.raises(ValueError, match="image 0 is a list of 2 images for one prompt, but the llava family takes 1"):
    air_jax.generate(organism, None, [[img, img]], ["Compare."], max_new_tokens=2)


def test_heads_from_numpy():
  """Heads picked with numpy (an [n, 2] array, or its rows) are read like lists of pairs."""
  from air_jax import AIRConfig

  want = AIRConfig.preset("air", heads=[[0, 2], [1, 3]]).heads
  assert AIRConfig.preset("air", heads=np.array([[0, 2], [1, 3]])).heads == want
  assert AIRConfig.preset("air", heads=list(np.argwhere(np.array([[0, 0, 1, 0], [0, 0, 0, 1]])))).heads == want
  with pytest.raises(ValueError, match="not a \\[layer, head\\] pair"):
    AIRConfig.preset("air", heads=np.array([[0, 2, 1]]))
