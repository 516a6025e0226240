"""Qwen2.5-VL and InternVL tensor-parallel on a (2, 4) mesh of 8 forced host devices equal one device (logits,
head_gate, greedy and AIR* tokens); the run happens in a subprocess (tests/scripts/sharded_check_vl.py)."""

import json
import os
import subprocess
import sys

import pytest

from tests.tiny_vl import make_tiny_internvl, make_tiny_qwen2_5_vl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.parametrize("build", [make_tiny_qwen2_5_vl, make_tiny_internvl], ids=["qwen2_5_vl", "internvl"])
def test_sharded_equals_one_device(build, tmp_path):
  build(str(tmp_path), heads=8, kv_heads=4, seed=2)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "scripts", "sharded_check_vl.py"),
                         str(tmp_path)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=1500)
  lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
  assert proc.returncode == 0 and lines, proc.stderr[-3000:]
  r = json.loads(lines[-1][len("RESULT "):])
  assert r["devices"] == 8
  assert r["q_shard"] == [r["q_shape"][0], r["q_shape"][1] // 4, r["q_shape"][2]]  # heads split 4 ways
  assert r["logits_plain_maxdiff"] < 1e-5 and r["logits_head_gate_maxdiff"] < 1e-5
  assert r["greedy_tokens_equal"] and r["air_star_tokens_equal"]
  assert r["greedy_scores_maxdiff"] < 1e-4 and r["air_star_scores_maxdiff"] < 1e-4
