"""eval.chair end to end on a tiny real checkpoint (generation through air_jax, then CHAIR scoring)."""

import json
import os

from eval.chair import main

COCO = os.path.join(os.path.dirname(__file__), "fixtures", "coco")


def test_cli_generates_and_scores_on_cpu(tiny_dir, tmp_path, capsys):
  argv = ["--coco-root", COCO, "--model", tiny_dir, "--num-images", "5", "--max-new-tokens", "6",
          "--batch-size", "2", "--backend", "cpu", "--out", str(tmp_path), "--no-progress"]
  assert main(argv) == 0
  table = capsys.readouterr().out
  assert "greedy" in table and "C_S" in table
  lines = (tmp_path / "greedy_captions.jsonl").read_text().splitlines()
  assert len(lines) == 5
  records = [json.loads(x) for x in lines]
  assert len({r["image_id"] for r in records}) == 5 and all(r["method"] == "greedy" for r in records)
  result = json.loads((tmp_path / "greedy_chair.json").read_text())
  assert result["config"]["model"] == tiny_dir
  # Random weights caption nonsense; every caption is scored (an empty one names no object), none is lost.
  assert len(result["sentences"]) == 5 and result["skipped"] == []
  # A rerun resumes: nothing is generated again, and the result is the same.
  assert main(argv) == 0
  assert (tmp_path / "greedy_captions.jsonl").read_text().splitlines() == lines
  assert json.loads((tmp_path / "greedy_chair.json").read_text())["overall_metrics"] == result["overall_metrics"]
