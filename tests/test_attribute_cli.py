"""`python -m eval.attribute` end to end on the tiny checkpoint and the COCO fixture, with crash and resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from air_jax.air_config import read_heads_file
from eval import attribute
from eval.chair import run as chair_run

FIXTURE = Path(__file__).parent / "fixtures" / "coco"
# Ground truth: 296284 donut; 97131 car, parking meter, truck; 52312 person, toothbrush; 543364 chair, couch,
# dining table, remote. The last caption has no hallucination and is left out (CHAIRs == 0).
CAPTIONS = [
    {"image_id": 296284, "caption": "A donut sits next to a dog. The dog eats a donut."},
    {"image_id": 97131, "caption": "A car parked by a giraffe near a truck."},
    {"image_id": 52312, "caption": "The old man holds a toothbrush and a cat."},
    {"image_id": 543364, "caption": "There is a table in the middle of the room."},
]


class Crash(RuntimeError):
  pass


@pytest.fixture(scope="module")
def chair_json(tmp_path_factory):
  d = tmp_path_factory.mktemp("chair")
  caps = d / "hand_captions.jsonl"
  caps.write_text("".join(json.dumps(c) + "\n" for c in CAPTIONS))
  chair_run(["--coco-root", str(FIXTURE), "--captions", str(caps), "--method", "hand", "--out", str(d),
             "--no-progress"])
  return d / "hand_chair.json"


def _args(chair, model, out, *extra):
  return ["--chair-json", str(chair), "--coco-root", str(FIXTURE), "--model", model, "--out", str(out),
          "--top-k", "3", "--chunk", "3", "--no-progress", "--backend", "cpu", *extra]


def _records(out):
  return [json.loads(line) for line in (out / attribute.RECORDS).read_text().splitlines()]


def test_end_to_end_and_resume(tmp_path, tiny_dir, chair_json):
  full = tmp_path / "full"
  summary = attribute.run(_args(chair_json, tiny_dir, full))
  for name in ("heads_S.json", "heads_E.json", "attribution.npz", "heatmap_S.png", "heatmap_E.png",
               "summary.json", attribute.STATE, attribute.RECORDS):
    assert (full / name).is_file(), name
  records = _records(full)
  assert [r["image_id"] for r in records] == [296284, 97131, 52312]
  first = records[0]
  assert [(t["set"], t["word"], t["locate"]) for t in first["scored"]] == [
      ("N", "donut", "position"), ("H", "dog", "position"), ("H", "dog", "position"), ("N", "donut", "position")]
  assert all(first["caption"][t["char_span"][0]:t["char_span"][1]].lower() == t["word"] for t in first["scored"])
  z = np.load(full / "attribution.npz")
  num_h = sum(r["num_H"] for r in records)
  num_n = sum(r["num_N"] for r in records)
  assert num_h == 4 and num_n == 6  # dog x2, giraffe, cat; donut x2, car, truck, man, toothbrush
  assert (z["count_H"] == num_h).all() and (z["count_N"] == num_n).all()
  np.testing.assert_allclose(z["S"], z["mean_H"] - z["mean_N"])
  np.testing.assert_allclose(z["E"], z["S"] / np.sqrt(z["var_H"] + z["var_N"]))
  np.testing.assert_array_equal(z["S"], z["prob_S"])
  assert np.abs(z["S"]).max() > 0
  heads = read_heads_file(full / "heads_S.json", top_k=3)
  flat = np.argsort(-z["S"].ravel(), kind="stable")[:3]
  assert [list(h) for h in heads] == [[int(i // 4), int(i % 4)] for i in flat]
  assert len(read_heads_file(full / "heads_E.json", "non_hal_heads")) == 3
  assert summary["num_samples"] == 3 and summary["num_tokens_H"] == 4

  # Crash after the first caption, a torn line appended to the records, then a rerun: same final output.
  part = tmp_path / "part"

  def crash(n):
    if n == 1:
      raise Crash("simulated crash")
  with pytest.raises(Crash):
    attribute.run(_args(chair_json, tiny_dir, part), on_sample=crash)
  assert len(_records(part)) == 1
  with open(part / attribute.RECORDS, "a") as f:
    f.write('{"image_id": 97131, "capt')
  attribute.run(_args(chair_json, tiny_dir, part))
  assert _records(part) == records
  zp = np.load(part / "attribution.npz")
  for key in z.files:
    np.testing.assert_array_equal(zp[key], z[key], err_msg=key)
  assert (part / "heads_S.json").read_text() == (full / "heads_S.json").read_text()

  # A resumed run must use the same settings.
  with pytest.raises(attribute.AttributionError, match="semantics"):
    attribute.run(_args(chair_json, tiny_dir, part, "--semantics", "full_sequence"))
  with pytest.raises(attribute.AttributionError, match="dtype='float32' but this run asks dtype='bfloat16'"):
    attribute.run(_args(chair_json, tiny_dir, part, "--dtype", "bfloat16"))
  # The same path with other captions in it is another input.
  changed = json.loads(Path(chair_json).read_text())
  changed["sentences"] = changed["sentences"][::-1]
  moved = tmp_path / "moved" / Path(chair_json).name
  moved.parent.mkdir()
  shutil.copy(chair_json, moved)
  other = tmp_path / "other_out"
  attribute.run(_args(moved, tiny_dir, other, "--limit", "1"))
  moved.write_text(json.dumps(changed))
  with pytest.raises(attribute.AttributionError, match="chair_json_sha256"):
    attribute.run(_args(moved, tiny_dir, other, "--limit", "1"))
  with pytest.raises(attribute.AttributionError, match="--limit must be at least 1, got -1"):
    attribute.run(_args(moved, tiny_dir, tmp_path / "neg", "--limit", "-1"))


def test_user_errors(tmp_path, tiny_dir, capsys):
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps({"overall_metrics": {}}))
  assert attribute.main(_args(bad, tiny_dir, tmp_path / "o")) == 2
  assert "sentences" in capsys.readouterr().err
  assert attribute.main(_args(bad, str(tmp_path / "missing"), tmp_path / "o")) == 2
  assert "not a directory" in capsys.readouterr().err


def test_too_few_scored_tokens_warn_in_the_summary(tmp_path, caplog):
  """One hallucinated token: E_h is undefined everywhere, so heads_E.json comes out empty; the run says so."""
  state = attribute.RunState(2, 3, {"model": "m"})
  rng = np.random.default_rng(0)
  for score in attribute.SCORES:
    state.stats[score].update("H", rng.normal(size=(1, 2, 3)))
    state.stats[score].update("N", rng.normal(size=(5, 2, 3)))
  summary = attribute.write_outputs(tmp_path, state, "prob", 2, "negative")
  assert json.loads((tmp_path / "heads_E.json").read_text())["hal_heads"] == []
  assert len(json.loads((tmp_path / "heads_S.json").read_text())["hal_heads"]) == 2
  assert any("only 1 hallucinated and 5 correct" in w for w in summary["warnings"])
  assert any("heads_E.json lists 0 hallucination heads of the 2 asked" in w for w in summary["warnings"])
  assert "heads_E.json lists 0" in caplog.text
