"""A whole eval.chair run compiles the generation once per method (partial last batches padded), and
--compile-cache writes JAX's persistent cache."""

from __future__ import annotations

import os

from air_jax import decoding
from air_jax.air_config import write_heads_file
from eval.chair import main

COCO = os.path.join(os.path.dirname(__file__), "fixtures", "coco")


def test_one_compilation_per_method(tiny_dir, tmp_path):
  from air_jax.compile_cache import disable_compile_cache

  heads = tmp_path / "heads.json"
  write_heads_file(heads, [[0, 1], [1, 2]])
  cache = tmp_path / "xla_cache"
  # 5 images in batches of 2: the last batch (1 image) is padded, so it reuses the graph of the full ones.
  argv = ["--coco-root", COCO, "--model", tiny_dir, "--num-images", "5", "--max-new-tokens", "5", "--batch-size",
          "2", "--backend", "cpu", "--method", "greedy,air_star", "--heads", str(heads), "--no-progress",
          "--compile-cache", str(cache)]
  decoding.generate_tokens_jit.clear_cache()
  before = decoding.TRACE_COUNT["generate"]
  try:
    assert main(argv + ["--out", str(tmp_path / "a")]) == 0
    assert decoding.TRACE_COUNT["generate"] - before == 2  # greedy and air_star, once each
    assert any(files for _, _, files in os.walk(cache)), "the persistent cache holds the compiled graphs"
    # A second run in the same process (new output directory): nothing is compiled again.
    assert main(argv + ["--out", str(tmp_path / "b"), "--num-images", "3"]) == 0
    assert decoding.TRACE_COUNT["generate"] - before == 2
  finally:
    disable_compile_cache()
  lines = (tmp_path / "a" / "greedy_captions.jsonl").read_text().splitlines()
  assert len(lines) == 5  # the padding rows are dropped
