"""The CHAIR CLI end to end on the fixture, with deterministic captioners; and the captions file formats."""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import pytest
from PIL import Image

from eval import captions_io
from eval.chair import main, make_captioner, run
from eval.coco import CocoImages

FIXTURE = Path(__file__).parent / "fixtures" / "coco"
FIRST_CAPTION = {}
for _ann in json.loads((FIXTURE / "annotations" / "captions_val2014.json").read_text())["annotations"]:
  FIRST_CAPTION.setdefault(_ann["image_id"], _ann["caption"])
ID_OF = {name: i for i, name in CocoImages(FIXTURE).file_names.items()}


def gt_captioner(method):
  """Captions every image with its first human caption; "air" also claims a giraffe."""
  def captioner(images, file_names):
    assert all(isinstance(im, Image.Image) and im.mode == "RGB" for im in images)
    suffix = " A giraffe stands nearby." if method == "air" else ""
    return [FIRST_CAPTION[ID_OF[name]] + suffix for name in file_names]
  return captioner


class Crash(RuntimeError):
  pass


def crashing_factory(crash_on_call):
  """A captioner that works like gt_captioner but raises on its ``crash_on_call``-th call."""
  calls = {"n": 0}

  def factory(method):
    inner = gt_captioner(method)

    def captioner(images, file_names):
      calls["n"] += 1
      if calls["n"] == crash_on_call:
        raise Crash(f"simulated crash on call {calls['n']}")
      return inner(images, file_names)
    return captioner
  return factory


def args(out, *extra, n=12):
  return ["--coco-root", str(FIXTURE), "--num-images", str(n), "--out", str(out), "--no-progress", *extra]


def comparable(result):
  return {k: result[k] for k in ("sentences", "overall_metrics", "skipped")}


# ---- generation, resume ------------------------------------------------------------------------------------


def test_generate_and_score_two_methods(tmp_path, capsys):
  assert main(args(tmp_path, "--method", "greedy,air", "--batch-size", "5"), gt_captioner) == 0
  table = capsys.readouterr().out
  assert "greedy" in table and "air" in table and "C_S" in table
  greedy = json.loads((tmp_path / "greedy_chair.json").read_text())
  air = json.loads((tmp_path / "air_chair.json").read_text())
  sample = CocoImages(FIXTURE).sample(12, 42)
  assert [s["image_id"] for s in greedy["sentences"]] == sample
  # a human caption names only ground-truth objects; the added giraffe is wrong unless there is one
  assert greedy["overall_metrics"]["CHAIRs"] == 0.0 and greedy["overall_metrics"]["CHAIRi"] == 0.0
  assert greedy["overall_metrics"]["Precision"] == 1.0
  with_giraffe = [s for s in air["sentences"] if "giraffe" in s["mscoco_gt_words"]]
  assert air["overall_metrics"]["CHAIRs"] == pytest.approx(1 - len(with_giraffe) / 12)
  first = air["sentences"][0]
  assert first["mscoco_hallucinated_words"][-1] == ["giraffe", "giraffe"]
  assert first["tokens"][first["hallucination_idxs"][-1]] == "giraffe"
  assert set(first) >= {"image_id", "caption", "mscoco_hallucinated_words", "mscoco_gt_words",
                        "mscoco_generated_words", "hallucination_idxs", "words", "metrics", "file_name"}
  assert set(first["metrics"]) >= {"CHAIRs", "CHAIRi"}
  assert air["config"]["seed"] == 42 and air["config"]["max_new_tokens"] == 64 and air["skipped"] == []
  records = [json.loads(line) for line in (tmp_path / "air_captions.jsonl").read_text().splitlines()]
  assert [r["image_id"] for r in records] == sample
  assert set(records[0]) >= {"image_id", "file_name", "caption", "method", "prompt", "max_new_tokens"}
  assert records[0]["method"] == "air" and records[0]["prompt"] == "Please describe this image in detail."


def test_resume_after_crash_gives_the_same_output(tmp_path):
  clean = tmp_path / "clean"
  run(args(clean, "--batch-size", "3"), gt_captioner)
  expected = json.loads((clean / "greedy_chair.json").read_text())

  out = tmp_path / "crashed"
  with pytest.raises(Crash):
    run(args(out, "--batch-size", "3"), crashing_factory(3))  # 2 batches of 3 done, then the crash
  path = out / "greedy_captions.jsonl"
  assert len(path.read_text().splitlines()) == 6
  with open(path, "a") as f:  # and a record torn in the middle of its write
    f.write('{"image_id": 1234, "file_na')
  with pytest.raises(Crash):  # the rerun crashes once more, after one more batch
    run(args(out, "--batch-size", "3"), crashing_factory(2))
  assert len(captions_io.read_jsonl_records(path)) == 9
  run(args(out, "--batch-size", "3"), gt_captioner)
  got = json.loads((out / "greedy_chair.json").read_text())
  assert comparable(got) == comparable(expected)
  ids = [json.loads(line)["image_id"] for line in path.read_text().splitlines()]
  assert sorted(ids) == sorted(CocoImages(FIXTURE).sample(12, 42)) and len(ids) == len(set(ids)) == 12
  # a finished run does not call the captioner again
  run(args(out, "--batch-size", "3"), crashing_factory(1))


def test_resume_with_other_settings_is_refused(tmp_path, capsys):
  run(args(tmp_path, n=3), gt_captioner)
  assert main(args(tmp_path, "--max-new-tokens", "256", n=3), gt_captioner) == 2
  assert "generated with max_new_tokens=64 but this run asks max_new_tokens=256" in capsys.readouterr().err


def test_other_sample_in_the_out_dir_is_skipped_not_scored(tmp_path):
  run(args(tmp_path, "--seed", "1", n=5), gt_captioner)
  result = run(args(tmp_path, "--seed", "2", n=5), gt_captioner)["greedy"]
  assert [s["image_id"] for s in result["sentences"]] == CocoImages(FIXTURE).sample(5, 2)
  stale = [s for s in result["skipped"] if s["reason"].startswith("image not in this run's sample")]
  assert len(stale) == len(set(CocoImages(FIXTURE).sample(5, 1)) - set(CocoImages(FIXTURE).sample(5, 2)))


def test_unreadable_image_is_skipped_and_listed(tmp_path):
  root = tmp_path / "coco"
  shutil.copytree(FIXTURE, root)
  images = CocoImages(root)
  victim = images.sample(6, 42)[2]
  images.image_path(victim).write_bytes(b"not a jpeg")
  out = tmp_path / "out"
  result = run(["--coco-root", str(root), "--num-images", "6", "--out", str(out), "--no-progress"],
               gt_captioner)["greedy"]
  assert [s["image_id"] for s in result["skipped"]] == [victim]
  assert "unreadable image" in result["skipped"][0]["reason"]
  assert len(result["sentences"]) == 5 and victim not in [s["image_id"] for s in result["sentences"]]


def test_empty_captions_are_scored_and_listed(tmp_path):
  # The reference script counts every caption: an empty one names no object, so C_S is over all 8.
  def factory(method):
    return lambda images, names: ["" if n % 2 else "A dog." for n, _ in enumerate(names)]
  result = run(args(tmp_path, "--batch-size", "4", n=8), factory)["greedy"]
  assert len(result["sentences"]) == 8 and result["skipped"] == []
  saved = json.loads((tmp_path / "greedy_chair.json").read_text())
  assert len(saved["empty_captions"]) == 4
  hallucinated = sum(bool(s["metrics"]["CHAIRs"]) for s in saved["sentences"])
  assert saved["overall_metrics"]["CHAIRs"] == pytest.approx(hallucinated / 8)
  assert all(s["metrics"]["CHAIRs"] == 0 for s in saved["sentences"] if not s["caption"])


def test_captioner_returning_the_wrong_count_is_an_error(tmp_path, capsys):
  assert main(args(tmp_path, n=3), lambda m: (lambda images, names: ["one"])) == 2
  assert "returned 1 items for 3 images" in capsys.readouterr().err


# ---- backend, model ----------------------------------------------------------------------------------------


def test_backend_tpu_fails_naming_the_devices(tmp_path, capsys):
  assert main(args(tmp_path, "--backend", "tpu"), gt_captioner) == 2
  err = capsys.readouterr().err
  assert "--backend tpu: backend 'tpu' was requested but JAX found no tpu device" in err and "cpu:0" in err
  assert not (tmp_path / "greedy_captions.jsonl").exists()


def test_backend_cpu_is_accepted(tmp_path):
  assert "greedy" in run(args(tmp_path, "--backend", "cpu", n=2), gt_captioner)


def test_generation_needs_a_model(tmp_path, capsys):
  assert main(args(tmp_path)) == 2
  assert "--model DIR is required" in capsys.readouterr().err
  assert main(args(tmp_path, "--method", "beam"), gt_captioner) == 2
  assert "unknown --method ['beam']" in capsys.readouterr().err


def test_make_captioner_uses_the_air_jax_contract(monkeypatch, tmp_path):
  calls = []

  def make(name, run_options=None):
    return ("cfg", name, (run_options or {}).get("heads") if name != "greedy" else None)

  fake_methods = types.SimpleNamespace(make=make, hyperparameters=lambda cfg: {"cfg": list(cfg)},
                                       as_compiled=lambda cfg, config: calls.append(("compile", cfg)))

  def load_pretrained(path, dtype):
    calls.append(("load", path, dtype))
    return types.SimpleNamespace(config="config")

  def generate(model, air_cfg, images, prompts, max_new_tokens, backend):
    calls.append(("generate", model, air_cfg, len(images), prompts, max_new_tokens, backend))
    return types.SimpleNamespace(texts=[f"caption {n}" for n in range(len(images))])

  fake = types.SimpleNamespace(methods=fake_methods, load_pretrained=load_pretrained, generate=generate)
  monkeypatch.setitem(sys.modules, "air_jax", fake)
  from eval import chair as chair_mod
  chair_mod._load_model.cache_clear()
  cap = make_captioner(str(tmp_path), "air_star", prompt="Describe.", max_new_tokens=7, backend="cpu",
                       heads="h.json")
  assert cap([Image.new("RGB", (2, 2))] * 2, ["a.jpg", "b.jpg"]) == ["caption 0", "caption 1"]
  greedy = make_captioner(str(tmp_path), "greedy", prompt="Describe.", max_new_tokens=7, backend=None)
  greedy([Image.new("RGB", (2, 2))], ["a.jpg"])
  chair_mod._load_model.cache_clear()
  model = types.SimpleNamespace(config="config")
  assert calls == [("load", str(tmp_path), "float32"), ("compile", ("cfg", "air_star", "h.json")),
                   ("generate", model, ("cfg", "air_star", "h.json"), 2, ["Describe."] * 2, 7, "cpu"),
                   ("compile", ("cfg", "greedy", None)),
                   ("generate", model, ("cfg", "greedy", None), 1, ["Describe."], 7, None)]
  assert cap.hyperparameters == {"cfg": ["cfg", "air_star", "h.json"]}


# ---- scoring existing captions files -----------------------------------------------------------------------


def _ours(tmp_path, n=6):
  run(args(tmp_path / "gen", "--method", "air", n=n), gt_captioner)
  return tmp_path / "gen" / "air_captions.jsonl"


def test_captions_file_in_every_format_scores_the_same(tmp_path):
  ours = _ours(tmp_path)
  records = [json.loads(line) for line in ours.read_text().splitlines()]
  opera = tmp_path / "opera.jsonl"
  opera.write_text("".join(json.dumps({"image_id": r["image_id"], "caption": r["caption"]}) + "\n"
                           for r in records))
  llava = tmp_path / "answers.jsonl"
  llava.write_text("\n".join(json.dumps({"question_id": r["image_id"], "image": r["file_name"], "prompt": "p",
                                         "text": r["caption"], "model_id": "m"}) for r in records))  # no final \n
  ref = tmp_path / "ref.json"
  ref.write_text(json.dumps({"overall": {"CIDEr": 0.1}, "imgToEval": {
    str(r["image_id"]): {"image_id": r["image_id"], "caption": r["caption"], "CIDEr": 0.1} for r in records}}))
  string_ids = tmp_path / "strings.jsonl"
  string_ids.write_text("".join(json.dumps({"image_id": str(r["image_id"]), "caption": r["caption"]}) + "\n"
                                for r in records))
  out = tmp_path / "scores"
  results = run(["--coco-root", str(FIXTURE), "--out", str(out), "--captions", str(ours), "--captions",
                 str(opera), "--captions", str(llava), "--captions", str(ref), "--captions", str(string_ids)])
  assert list(results) == ["air", "opera", "answers", "ref", "strings"]
  metrics = [r["overall_metrics"] for r in results.values()]
  assert all(m == metrics[0] for m in metrics) and metrics[0]["num_captions"] == 6
  assert (out / "ref_chair.json").exists() and results["answers"]["sentences"][0]["file_name"]


def test_captions_file_from_another_image_set(tmp_path, capsys):
  other = tmp_path / "other.jsonl"
  other.write_text("".join(json.dumps({"image_id": i, "caption": "A dog."}) + "\n" for i in (1, 2, 3)))
  assert main(["--coco-root", str(FIXTURE), "--out", str(tmp_path), "--captions", str(other)]) == 2
  err = capsys.readouterr().err
  assert "none of its 3 captions can be scored" in err and "another image set" in err
  # partly foreign: the known ones are scored, the others listed
  mixed = tmp_path / "mixed.jsonl"
  mixed.write_text(other.read_text() + json.dumps({"image_id": 296284, "caption": "Donuts."}) + "\n"
                   + json.dumps({"image_id": 296284, "caption": "Again donuts."}) + "\n")
  result = run(["--coco-root", str(FIXTURE), "--out", str(tmp_path), "--captions", str(mixed)])["mixed"]
  assert [s["image_id"] for s in result["sentences"]] == [296284]
  assert [s["image_id"] for s in result["skipped"]] == [1, 2, 3, 296284]
  assert result["skipped"][0]["reason"].startswith("unknown image id")
  assert result["skipped"][3]["reason"].startswith("duplicate caption")


def test_bad_captions_files_are_named(tmp_path, capsys):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"image_id": 296284, "caption": "x"}\nnot json\n{"image_id": 1, "caption": "y"}\n')
  assert main(["--coco-root", str(FIXTURE), "--out", str(tmp_path), "--captions", str(bad)]) == 2
  assert "bad.jsonl:2: not a JSON object" in capsys.readouterr().err
  nofield = tmp_path / "nofield.jsonl"
  nofield.write_text('{"img": 296284, "caption": "x"}\n')
  assert main(["--coco-root", str(FIXTURE), "--out", str(tmp_path), "--captions", str(nofield)]) == 2
  assert "nofield.jsonl:1: record has neither 'image_id' nor 'question_id'" in capsys.readouterr().err
  assert main(["--coco-root", str(FIXTURE), "--out", str(tmp_path), "--captions", str(tmp_path / "x.jsonl")]) == 2
  assert "captions file not found" in capsys.readouterr().err


# ---- captions_io -------------------------------------------------------------------------------------------


def test_torn_last_line_is_ignored_then_repaired(tmp_path, caplog):
  path = tmp_path / "c.jsonl"
  writer = captions_io.CaptionsWriter(path)
  writer.write({"image_id": 1, "caption": "a"})
  writer.write({"image_id": 2, "caption": "b"})
  with open(path, "a") as f:
    f.write('{"image_id": 3, "capt')
  assert captions_io.done_ids(path) == {1, 2}
  assert "incomplete last line" in caplog.text
  captions_io.CaptionsWriter(path).write({"image_id": 3, "caption": "c"})
  assert [json.loads(line)["image_id"] for line in path.read_text().splitlines()] == [1, 2, 3]
  # a complete last record without its newline is kept and terminated
  with open(path, "a") as f:
    f.write('{"image_id": 4, "caption": "d"}')
  captions_io.CaptionsWriter(path).write({"image_id": 5, "caption": "e"})
  assert captions_io.done_ids(path) == {1, 2, 3, 4, 5}
  with pytest.raises(ValueError, match="lacks 'caption'"):
    captions_io.CaptionsWriter(path).write({"image_id": 6})


def test_load_captions_rejects_odd_ids(tmp_path):
  path = tmp_path / "c.json"
  path.write_text(json.dumps([{"image_id": True, "caption": "x"}]))
  with pytest.raises(captions_io.CaptionsFormatError, match=r"image id must be an integer or a string"):
    captions_io.load_captions(path)
  path.write_text(json.dumps({"sentences": [{"image_id": 5, "caption": 7}]}))
  with pytest.raises(captions_io.CaptionsFormatError, match=r"sentences\[0\]: 'caption' must be a string"):
    captions_io.load_captions(path)
  jl = tmp_path / "c.jsonl"
  jl.write_bytes(b'{"image_id": 1, "caption": "a \xff"}\n')
  with pytest.raises(captions_io.CaptionsFormatError, match=r"c.jsonl: not UTF-8 text \(byte 30: invalid start byte"):
    list(captions_io.iter_jsonl(jl))


def test_bad_preset_fails_before_any_generation(tmp_path, capsys):
  def factory(method):
    if method == "air":
      raise ValueError("preset 'air' targets sensitive heads but no heads were given")
    return gt_captioner(method)
  assert main(args(tmp_path, "--method", "greedy,air"), factory) == 2
  assert "no heads were given" in capsys.readouterr().err
  assert not (tmp_path / "greedy_captions.jsonl").exists()


def test_custom_synonyms_file_scores_with_the_same_code(tmp_path):
  synonyms = tmp_path / "syn.txt"
  coco_lines = (Path(__file__).parents[1] / "eval" / "data" / "coco_chair_synonyms.txt").read_text()
  synonyms.write_text(coco_lines + "unicorn, pegasus\n")
  captions = tmp_path / "u.jsonl"
  captions.write_text(json.dumps({"image_id": 296284, "caption": "Donuts and two unicorns."}) + "\n")
  result = run(["--coco-root", str(FIXTURE), "--out", str(tmp_path), "--captions", str(captions),
                "--synonyms", str(synonyms)])["u"]
  assert result["sentences"][0]["mscoco_hallucinated_words"] == [["unicorns", "unicorn"]]
  assert result["config"]["vocab_sha256"] != run(
    ["--coco-root", str(FIXTURE), "--out", str(tmp_path), "--captions", str(captions)])["u"]["config"]["vocab_sha256"]


def test_reference_split_flag(tmp_path):
  captions = tmp_path / "m.jsonl"
  captions.write_text(json.dumps({"image_id": 296284, "caption": "Donuts on a motor bike."}) + "\n")
  base = ["--coco-root", str(FIXTURE), "--out", str(tmp_path), "--captions", str(captions)]
  stripped = run(base)["m"]["sentences"][0]
  assert stripped["mscoco_hallucinated_words"] == [["motor bike", "motorcycle"]]
  exact = run(base + ["--reference-split"])["m"]
  assert exact["sentences"][0]["mscoco_hallucinated_words"] == [] and exact["config"]["reference_split"]


def test_air_config_file_is_validated(tmp_path, capsys):
  bad = tmp_path / "air.json"
  bad.write_text('{"greedy": {"beta": 0.2}}')
  assert main(args(tmp_path, "--air-config", str(bad)), gt_captioner) == 2
  assert "unknown method 'greedy'" in capsys.readouterr().err
  bad.write_text("[1, 2]")
  assert main(args(tmp_path, "--air-config", str(bad)), gt_captioner) == 2
  assert "expected an object" in capsys.readouterr().err
