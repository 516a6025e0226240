"""eval.chair --splits K (mean and std over K samples), CHAIR manifests and eval.rerun."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from eval import chair, chair_splits, manifest, rerun
from eval.coco import CocoImages

FIXTURE = Path(__file__).parent / "fixtures" / "coco"
FIRST = {}
for _ann in json.loads((FIXTURE / "annotations" / "captions_val2014.json").read_text())["annotations"]:
  FIRST.setdefault(_ann["image_id"], _ann["caption"])
ID_OF = {name: i for i, name in CocoImages(FIXTURE).file_names.items()}


def captioner_factory(method):
  def captioner(images, file_names):  # every third image also gets a hallucinated giraffe
    return [FIRST[ID_OF[n]] + (" A giraffe stands nearby." if ID_OF[n] % 3 == 0 else "") for n in file_names]
  return captioner


def test_make_splits_modes():
  ids = list(range(100, 180))
  s = chair_splits.make_splits(ids, 12, 4, seed=42)
  assert s[0] == random.Random(42).sample(ids, 12)  # the first split is the usual sample
  assert len(chair_splits.union(s)) == 48  # disjoint
  seeded = chair_splits.make_splits(ids, 12, 3, seed=7, mode="seeded")
  assert seeded == [random.Random(7 + i).sample(ids, 12) for i in range(3)]
  with pytest.raises(ValueError, match="need 96 images"):
    chair_splits.make_splits(ids, 24, 4, seed=0)


def test_chair_splits_mean_std_and_manifest(tmp_path):
  out = tmp_path / "res"
  base = ["--coco-root", str(FIXTURE), "--num-images", "12", "--no-progress"]
  res = chair.run(base + ["--out", str(out), "--splits", "3"], captioner_factory=captioner_factory)["greedy"]
  sp = res["splits"]
  assert sp["k"] == 3 and sp["num_images"] == [12, 12, 12] and sp["mode"] == "disjoint"
  single = chair.run(base + ["--out", str(tmp_path / "one")], captioner_factory=captioner_factory)["greedy"]
  assert sp["per_split"][0] == single["overall_metrics"]  # split 0 is the usual 12-image run
  values = [r["CHAIRs"] for r in sp["per_split"]]
  mean = sum(values) / 3
  assert sp["summary"]["CHAIRs"]["mean"] == pytest.approx(mean)
  assert sp["summary"]["CHAIRs"]["std"] == pytest.approx((sum((v - mean) ** 2 for v in values) / 2) ** 0.5)
  assert len(set(values)) > 1  # the splits differ
  lines = (out / "greedy_captions.jsonl").read_text().splitlines()
  assert len(lines) == 36  # each image captioned once
  man = manifest.read(out / "chair_greedy_manifest.json", "chair")
  assert man["num_samples"] == 36 and {s["split"] for s in man["samples"]} == {0, 1, 2}
  assert man["settings"]["cli"]["splits"] == 3 and man["settings"]["prompt"] == chair.DEFAULT_PROMPT
  assert man["method"]["name"] == "greedy" and man["seed"] == 42
  assert "mean" not in chair_splits.format_summary({"greedy": single}) and "+-" in chair_splits.format_summary(
    {"greedy": res})


def test_rerun_chair_from_manifest(tmp_path, monkeypatch, capsys):
  model = tmp_path / "model"
  model.mkdir()
  (model / "config.json").write_text("{}")
  out = tmp_path / "res"
  argv = ["--coco-root", str(FIXTURE), "--num-images", "10", "--no-progress", "--out", str(out), "--model",
          str(model), "--splits", "2", "--split-mode", "seeded", "--seed", "5"]
  monkeypatch.setattr(chair, "make_captioner", lambda model_dir, method, **kw: captioner_factory(method))
  first = chair.run(argv)["greedy"]
  man = manifest.read(out / "chair_greedy_manifest.json")
  assert man["model_sha256"] == manifest.directory_hash(model)
  assert rerun.main([str(out / "chair_greedy_manifest.json"), "--out", str(tmp_path / "again")]) == 0
  again = json.loads((tmp_path / "again" / "greedy_chair.json").read_text())
  assert again["splits"] == first["splits"] and again["overall_metrics"] == first["overall_metrics"]
  # A manifest value eval.chair's flags refuse is named with the manifest, not with eval.chair's usage text.
  edited = json.loads((out / "chair_greedy_manifest.json").read_text())
  edited["settings"]["cli"]["max_new_tokens"] = "four"
  path = tmp_path / "edited.json"
  path.write_text(json.dumps(edited))
  capsys.readouterr()
  assert rerun.main([str(path), "--out", str(tmp_path / "third")]) == 2
  err = capsys.readouterr().err
  assert "usage:" not in err and (f"error: {path}: its settings are not a valid eval.chair run: argument "
                                  "--max-new-tokens: invalid int value: 'four'") in err


def test_rerun_rejects_a_bad_manifest(tmp_path, capsys):
  bad = tmp_path / "m.json"
  bad.write_text('{"benchmark": "chair"}')
  assert rerun.main([str(bad)]) == 2
  assert "missing field" in capsys.readouterr().err
