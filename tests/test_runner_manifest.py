"""eval.runner (method resolution, resumable answering) and eval.manifest (hashes, versions, validation)."""

from __future__ import annotations

import json

import pytest

from eval import manifest, runner
from eval.organism_default import AIR_CONFIG, HEADS


def test_resolve_method_maps_names_like_eval_chair():
  import air_jax

  cfg, hp = runner.resolve_method("greedy")
  assert cfg == air_jax.methods.make("greedy")
  assert hp == {**air_jax.methods.hyperparameters(cfg), "heads_file": None}
  overrides = json.loads(AIR_CONFIG.read_text())["air"]
  cfg, hp = runner.resolve_method("air", str(HEADS), overrides)
  assert cfg == air_jax.AIRConfig.preset("air", heads=str(HEADS), **overrides)
  assert hp["visual_factor"] == overrides["visual_factor"] and hp["heads_file"] == str(HEADS)
  assert hp["heads"] == [list(h) for h in cfg.heads]  # resolved, JSON-ready
  json.dumps(hp)
  with pytest.raises(runner.RunError, match="unknown method 'no_such_method'"):
    runner.resolve_method("no_such_method")
  with pytest.raises(runner.RunError, match="heads"):
    runner.resolve_method("air")  # AIR targets sensitive heads: no silent default
  with pytest.raises(runner.RunError, match="method greedy.*beta"):
    runner.resolve_method("greedy", overrides={"beta": 0.1})


def test_answer_samples_resume_torn_tail_and_settings_check(tmp_path):
  samples = [{"id": i, "image": f"img{i}", "prompt": f"q{i}"} for i in range(5)]
  seen = []

  def answerer(images, prompts):
    seen.extend(prompts)
    return [p.upper() for p in prompts]

  path = tmp_path / "answers.jsonl"
  meta = {"method": "greedy", "max_new_tokens": 8, "model_sha256": "abc"}
  runner.answer_samples(samples[:3], answerer, path, meta=meta, batch_size=2, progress=False,
                        load_image=lambda x: x)
  with open(path, "a") as f:
    f.write('{"id": 3, "answ')  # a write torn by a crash
  got, skipped = runner.answer_samples(samples, answerer, path, meta=meta, batch_size=2, progress=False,
                                       load_image=lambda x: x)
  assert seen == ["q0", "q1", "q2", "q3", "q4"] and not skipped  # nothing answered twice, the torn one redone
  assert {k: v["answer"] for k, v in got.items()} == {i: f"Q{i}" for i in range(5)}
  with pytest.raises(runner.RunError, match="max_new_tokens=8 but this run has max_new_tokens=16"):
    runner.answer_samples(samples, answerer, path, meta={**meta, "max_new_tokens": 16}, progress=False,
                          load_image=lambda x: x)

  with pytest.raises(runner.RunError, match="for the prompt 'q0'"):
    runner.answer_samples([{"id": 0, "image": "x", "prompt": "other"}], answerer, path, meta=meta, progress=False,
                          load_image=lambda x: x)

  def broken(x):
    raise OSError("truncated file")

  got, skipped = runner.answer_samples([{"id": 9, "image": "x", "prompt": "q"}], answerer, tmp_path / "b.jsonl",
                                       meta=meta, progress=False, load_image=broken)
  assert not got and "truncated file" in skipped[0]["reason"]


def test_manifest_hash_version_and_validation(tmp_path):
  d = tmp_path / "m"
  d.mkdir()
  (d / "a.bin").write_bytes(b"x" * 10)
  h1 = manifest.directory_hash(d)
  (d / "a.bin").write_bytes(b"y" * 11)
  assert manifest.directory_hash(d) != h1
  assert manifest.code_version().startswith(("git ", "air-jax ", "unknown"))
  man = manifest.build("pope", samples=[{"id": 1}], method={"name": "greedy"}, settings={"k": 1}, model_dir=str(d),
                       seed=3)
  p = manifest.write(tmp_path / "pope_greedy_manifest.json", man)
  assert manifest.read(p, "pope")["model_sha256"] == manifest.directory_hash(d)
  with pytest.raises(manifest.ManifestError, match="not 'mmvet'"):
    manifest.read(p, "mmvet")
  p.write_text("{not json")
  with pytest.raises(manifest.ManifestError, match="not valid JSON"):
    manifest.read(p)
  assert runner.mean_std([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "n": 3}
  assert runner.mean_std([4.0])["std"] is None
