"""Tensor-parallel inference on a (2, 4) (data, model) mesh of 8 forced host devices equals one device.

The 8-device run happens in a subprocess (XLA_FLAGS must be set before JAX starts), see
tests/scripts/sharded_check.py.
"""

import json
import os
import subprocess
import sys

import pytest
from jax.sharding import PartitionSpec

from air_jax.sharding import make_mesh, per_device_bytes, spec_for
from models.llava import FAMILY
from tests.tiny import make_tiny_llava_next

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def sharded_result(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tiny_next_tp"))
  make_tiny_llava_next(path, heads=8, kv_heads=4, seed=2)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "scripts", "sharded_check.py"), path],
                        capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  assert proc.returncode == 0 and lines, proc.stderr[-3000:]
  return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.slow
def test_weights_are_split_megatron_style(sharded_result):
  r = sharded_result
  assert r["devices"] == 8
  assert r["q_spec"] == ["None", "model", "None"]
  l, out, inp = r["q_shape"]
  assert r["q_shard"] == [l, out // 4, inp]  # column parallel: heads split over the 4-way model axis
  assert r["o_shard"][2] == r["q_shape"][1] // 4  # row parallel
  assert r["fc1_shard"][1] == 64 // 4  # the vision tower is split too


@pytest.mark.slow
def test_sharded_logits_and_head_gate_equal_one_device(sharded_result):
  r = sharded_result
  assert r["logits_plain_maxdiff"] < 1e-5
  assert r["logits_head_gate_maxdiff"] < 1e-5
  assert r["head_gate_effect"] > 1e-3  # the gate matters, so equality means something


@pytest.mark.slow
def test_batch_is_padded_to_the_data_axis(sharded_result):
  assert sharded_result["rows_for_3_examples"] == 4  # not 8, the device count
  assert sharded_result["dola_batch_js_tokens_equal"]


@pytest.mark.slow
def test_sharded_greedy_and_air_tokens_equal_one_device(sharded_result):
  r = sharded_result
  assert r["greedy_tokens_equal"] and r["air_star_tokens_equal"]
  assert r["greedy_scores_maxdiff"] < 1e-4 and r["air_star_scores_maxdiff"] < 1e-4
  assert r["greedy_tokens"] != r["air_star_tokens"]  # AIR changes the output


def test_rules_split_only_divisible_dims():
  from models.config import LlavaConfig

  rules = FAMILY.partition_rules(LlavaConfig())
  assert spec_for(rules, ("language_model", "layers", "self_attn", "k_proj", "weight"), (2, 12, 8), 4) == \
      PartitionSpec(None, "model", None)
  assert spec_for(rules, ("language_model", "layers", "self_attn", "k_proj", "weight"), (2, 10, 8), 4) == \
      PartitionSpec(None, None, None)
  assert spec_for(rules, ("language_model", "norm", "weight"), (8,), 4) == PartitionSpec()
  assert per_device_bytes((2, 12, 8), 2, PartitionSpec(None, "model", None), {"data": 2, "model": 4}) == 2 * 3 * 8 * 2
  with pytest.raises(ValueError, match="needs 6 devices"):
    make_mesh(model=3, data=2)
