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
