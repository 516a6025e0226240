"""`python -m air_jax.plan`: per-device memory of LLaVA-NeXT-34B (bfloat16) on 4 x 24 GB and 8 x 16 GB."""

import os
import shutil

import pytest

from air_jax.plan import main, plan

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "configs")


@pytest.fixture(scope="module")
def dir_34b(tmp_path_factory):
  d = tmp_path_factory.mktemp("llava_34b_config")
  shutil.copy(os.path.join(FIXTURES, "llava-v1.6-34b-hf.json"), d / "config.json")
  return str(d)


def test_34b_fits_4x24_and_8x16_but_not_one_device(dir_34b, capsys):
  p4 = plan(dir_34b, 4, "bfloat16", device_memory=24)
  p8 = plan(dir_34b, 8, "bfloat16", device_memory=16)
  p1 = plan(dir_34b, 1, "bfloat16", device_memory=24)
  assert p4.num_params == 34_752_083_968 and p4.fits and p8.fits and not p1.fits
  # Nearly everything is split: per-device params within 0.5 % of an even share.
  assert abs(p4.params - p1.params / 4) < 0.005 * p1.params / 4
  assert abs(p8.params - p1.params / 8) < 0.005 * p1.params / 8
  # KV cache exactly: 60 layers x (k, v) x (prompt + new) slots x 8 KV heads x 128 x 2 bytes, heads split.
  slots = p4.prompt_tokens + p4.new_tokens
  assert p1.kv_cache == 60 * 2 * slots * 8 * 128 * 2 and p4.kv_cache == p1.kv_cache // 4
  assert main(["--model", dir_34b, "--devices", "4", "--dtype", "bfloat16", "--device-memory", "24"]) == 0
  out = capsys.readouterr().out
  assert "FITS in 24 GB" in out and "params" in out and "kv cache" in out
  assert main(["--model", dir_34b, "--devices", "2", "--device-memory", "16"]) == 1
  assert "DOES NOT FIT" in capsys.readouterr().out


def test_bad_arguments_are_reported(dir_34b, tmp_path, capsys):
  assert main(["--model", dir_34b, "--devices", "6", "--model-parallel", "4"]) == 2
  assert "must divide" in capsys.readouterr().err
  assert main(["--model", dir_34b, "--devices", "0"]) == 2
  assert "--devices must be at least 1, got 0" in capsys.readouterr().err
  assert main(["--model", str(tmp_path), "--devices", "2"]) == 2
  assert "config.json" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(os.listdir(FIXTURES)))
def test_every_fixture_config_loads_and_plans(name, tmp_path):
  """Every real-shaped config loads through load_config and gets a plan: SigLIP's 384 px in 14 px patches,
  DeepSeek-VL2-Tiny's zero MLA dims (no MLA), InstructBLIP's Q-Former layer tuple in the shape tree."""
  from air_jax.loading import load_config

  shutil.copy(os.path.join(FIXTURES, name), tmp_path / "config.json")
  config, _ = load_config(str(tmp_path))
  p = plan(str(tmp_path), 2, "bfloat16", device_memory=80)
  assert p.num_params > 1e9 and p.params > 0 and p.kv_cache > 0, (name, p)


def test_config_checks_keep_real_errors(tmp_path):
  import json

  from air_jax.loading import load_config

  raw = json.load(open(os.path.join(FIXTURES, "deepseek-vl2-tiny.json")))
  for where, key, value, match in (("vision_config", "patch_size", 400, "smaller than"),
                                   ("language_config", "hidden_size", 0, "must be a positive integer"),
                                   ("language_config", "use_mla", True, "qk_rope_head_dim")):
    bad = json.loads(json.dumps(raw))
    bad[where][key] = value
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=match):
      load_config(str(tmp_path))


def test_a_model_parallel_size_that_divides_nothing_is_noted(dir_34b, capsys):
  p = plan(dir_34b, 3, "bfloat16", model_parallel=3)
  assert "divides few of the tensors" in p.replicated_note and p.params > 0.9 * p.num_params * 2
  for mp in (2, 4, 8):  # good splits (a few small tensors kept whole) get no note
    assert plan(dir_34b, mp, "bfloat16").replicated_note == "", mp


def test_moe_experts_are_counted_and_split(tmp_path):
  """InternVL3_5-30B-A3B-HF (Qwen3-MoE): the plan counts every expert (its count is the model's), and the experts,
  split inside each expert on the model axis, leave about a quarter of the bytes per device at model-parallel 4."""
  import jax

  from air_jax.loading import load_config
  from models.params import count_params

  shutil.copy(os.path.join(FIXTURES, "InternVL3_5-30B-A3B-HF.json"), tmp_path / "config.json")
  config, fam = load_config(str(tmp_path))
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, "bfloat16"), fam.param_shapes(config),
                          is_leaf=lambda x: isinstance(x, tuple))
  p4 = plan(str(tmp_path), 4, "bfloat16", device_memory=80)
  p1 = plan(str(tmp_path), 1, "bfloat16", device_memory=80)
  assert p4.num_params == p1.num_params == count_params(abstract) > 30e9
  assert p1.params == 2 * p1.num_params and abs(p4.params - p1.params / 4) < 0.01 * p1.params / 4
