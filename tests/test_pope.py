"""POPE: reference scoring on the official files, the builder's three rules, the organism's splits, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval import pope, pope_data

FIX = Path(__file__).resolve().parent / "fixtures"
POPE_DIR = FIX / "pope"
COCO = FIX / "coco"


@pytest.fixture(scope="module")
def official():
  return {s: pope_data.read_questions(f) for s, f in pope_data.split_files(POPE_DIR).items()}


def test_official_files_shape(official):
  for split, qs in official.items():
    assert len(qs) == 3000
    assert len({q["image"] for q in qs}) == 500
    assert [q["label"] for q in qs[:6]] == ["yes", "no"] * 3  # positive, negative, alternating
    assert sum(q["label"] == "yes" for q in qs) == 1500


def test_reference_parser_quirks():
  ref = pope_data.parse_reference
  assert ref("No, there is not.") == "no"
  assert ref("Yes. There is no cat.") == "yes"  # only the first sentence counts
  assert ref("Not at all.") == "yes"  # "Not" (capital) is not a negation word for the reference
  assert ref("") == "yes" and ref("A cat.") == "yes"  # anything without no/not is a yes
  assert ref("no\nidea") == "yes"  # split on single spaces: "no\nidea" is one word
  strict = pope_data.parse_strict
  assert strict("Not at all.") == "no" and strict("A cat.") is None and strict("") is None
  assert strict("I'm not sure.") is None and strict("There is a dog on the left.") == "yes"
  assert strict("Yes, there is.") == "yes" and strict("The image doesn't show one.") == "no"
  assert strict("It's not clear.") is None  # a hedge, not a "no"


def test_reference_scoring_hand_counts(official):
  qs = official["random"]
  labels = [q["label"] for q in qs]
  # all "Yes": TP = FP = 1500.
  m = pope_data.score(labels, [pope_data.parse_reference("Yes, there is.") for _ in qs])
  assert (m["TP"], m["FP"], m["TN"], m["FN"]) == (1500, 1500, 0, 0)
  assert m["accuracy"] == 0.5 and m["precision"] == 0.5 and m["recall"] == 1.0 and m["yes_ratio"] == 1.0
  assert m["f1"] == pytest.approx(2 / 3)
  # "No." on questions 1..10 (5 yes, 5 no labels, alternating), "Yes" elsewhere.
  answers = ["No." if q["question_id"] <= 10 else "Yes" for q in qs]
  m = pope_data.score(labels, [pope_data.parse_reference(a) for a in answers])
  assert (m["TP"], m["FP"], m["TN"], m["FN"]) == (1495, 1495, 5, 5)
  assert m["accuracy"] == pytest.approx(1500 / 3000) and m["recall"] == pytest.approx(1495 / 1500)
  assert m["yes_ratio"] == pytest.approx(2990 / 3000)
  # perfect answers, written the way models answer
  answers = ["Yes, there is a {}.".format(q["text"]) if q["label"] == "yes" else "No, there is not." for q in qs]
  m = pope_data.score(labels, [pope_data.parse_reference(a) for a in answers])
  assert m["accuracy"] == 1.0 and m["f1"] == 1.0 and m["yes_ratio"] == 0.5
  # the strict parser: unparsed answers count against accuracy and recall, never as yes
  m = pope_data.score(["yes", "no", "yes", "no"], ["yes", None, None, "no"])
  assert (m["TP"], m["FP"], m["TN"], m["FN"], m["unparsed"]) == (1, 0, 1, 1, 2)
  assert m["accuracy"] == 0.5 and m["precision"] == 1.0 and m["recall"] == 0.5 and m["yes_ratio"] == 0.25


def test_malformed_question_file(tmp_path):
  bad = tmp_path / "coco_pope_random.json"
  bad.write_text('{"question_id": 1, "image": "a.jpg", "text": "Is there a cat in the image?", "label": "yes"}\n'
                 '{"question_id": 2, "image": "a.jpg", "text": "Is there a dog in the image?", "label": "maybe"}\n')
  with pytest.raises(pope_data.PopeDataError, match=r"coco_pope_random.json:2: label"):
    pope_data.read_questions(bad)
  bad.write_text('{"question_id": 1, "image": "a.jpg"}\n')
  with pytest.raises(pope_data.PopeDataError, match=r":1: missing field 'text'"):
    pope_data.read_questions(bad)


def test_question_text_article():
  assert pope_data.question_text("umbrella") == "Is there an umbrella in the image?"
  assert pope_data.question_text("dining table") == "Is there a dining table in the image?"


@pytest.fixture(scope="module")
def coco_records():
  return pope_data.objects_from_instances(COCO / "annotations" / "instances_val2014.json")


def test_builder_three_rules(coco_records):
  splits = pope_data.build_splits(coco_records, num_images=30, seed=3)
  assert splits == pope_data.build_splits(coco_records, num_images=30, seed=3)  # seeded
  assert splits["random"] != pope_data.build_splits(coco_records, num_images=30, seed=4)["random"]
  by_image = {r["image"]: r["objects"] for r in coco_records}
  drawn = list(dict.fromkeys(q["image"] for q in splits["random"]))
  assert len(drawn) == 30 and all(len(by_image[i]) >= 3 for i in drawn)
  drawn_records = [{"image": i, "objects": by_image[i]} for i in drawn]
  freq = pope_data.frequencies(drawn_records)
  popular = pope_data.popular_order(freq)
  cooc = pope_data.co_occurrence(drawn_records)
  for split, qs in splits.items():
    assert [q["question_id"] for q in qs] == list(range(1, len(qs) + 1))
    for image in drawn:
      mine = [q for q in qs if q["image"] == image]
      assert [q["label"] for q in mine] == ["yes", "no"] * 3
      pos = [q["object"] for q in mine if q["label"] == "yes"]
      neg = [q["object"] for q in mine if q["label"] == "no"]
      assert pos == by_image[image][:3]  # the reference takes the first objects
      assert not set(neg) & set(by_image[image]) and len(set(neg)) == 3
      assert set(neg) <= set(freq)  # negatives come from the objects of the drawn images
      if split == "popular":  # the most frequent absent objects, in order
        assert neg == [o for o in popular if o not in by_image[image]][:3]
      if split == "adversarial":
        taken = set(by_image[image])
        for p, n in zip(pos, neg):
          ranked = [o for o in cooc[p] if o not in taken]
          if ranked:
            assert n == ranked[0]
          taken.add(n)


def test_builder_needs_enough_images(coco_records):
  with pytest.raises(pope_data.PopeDataError, match="lower --num-images"):
    pope_data.build_splits(coco_records, num_images=500)


@pytest.fixture(scope="module")
def organism_root(tmp_path_factory):
  from organism.dataset import write_dataset

  root = tmp_path_factory.mktemp("organism_pope")
  write_dataset(root, n_train=0, n_test=40, seed=0)
  return root


def test_organism_labels_true_by_construction(organism_root):
  from organism.vocab import GROUP_OF

  splits = pope.organism_questions(organism_root, seed=0)
  scenes = {s["file_name"]: s for s in json.loads(
    (organism_root / "annotations" / "scenes_test.json").read_text())["scenes"]}
  hits = 0
  for split, qs in splits.items():
    assert len(qs) % 6 == 0 and qs
    for q in qs:
      names = {o["name"] for o in scenes[q["image"]]["objects"]}
      assert (q["object"] in names) == (q["label"] == "yes"), q
    if split == "adversarial":
      for i in range(0, len(qs), 2):
        pos, neg = qs[i], qs[i + 1]
        names = {o["name"] for o in scenes[pos["image"]]["objects"]}
        absent_partners = [m for m in GROUP_OF.get(pos["object"], ()) if m not in names]
        if absent_partners and neg["object"] in absent_partners:
          hits += 1
  assert hits > 0  # the absent member of a co-occurrence group is asked about


def _fake_answerer(calls):
  def answer(images, prompts):
    calls.append(len(prompts))
    return ["Yes, there is." if len(p) % 3 else "No." for p in prompts]  # a function of the sample only

  return answer


def test_cli_builds_resumes_and_reruns_from_manifest(tmp_path, coco_records):
  out = tmp_path / "res"
  model = tmp_path / "model"
  model.mkdir()
  (model / "config.json").write_text("{}")
  argv = ["--instances", str(COCO / "annotations" / "instances_val2014.json"), "--image-dir", str(COCO / "val2014"),
          "--num-images", "6", "--seed", "1", "--out", str(out), "--model", str(model), "--no-progress",
          "--batch-size", "4"]
  # a first run that dies after two batches keeps what it answered
  calls = []

  def dying(method):
    inner = _fake_answerer(calls)

    def answer(images, prompts):
      if len(calls) == 2:
        raise KeyboardInterrupt
      return inner(images, prompts)

    return answer

  with pytest.raises(KeyboardInterrupt):
    pope.run(argv, answerer_factory=dying)
  answers = out / "pope_greedy_answers.jsonl"
  assert len(answers.read_text().splitlines()) == 8
  calls.clear()
  results = pope.run(argv, answerer_factory=lambda m: _fake_answerer(calls))
  distinct = len({(q["image"], q["text"]) for qs in results["greedy"]["questions"] for q in [qs]})
  assert sum(calls) == distinct - 8  # resumed: only the missing samples were answered
  res = json.loads((out / "pope_greedy.json").read_text())
  assert set(res["metrics"]["reference"]["splits"]) == set(pope_data.SPLITS)
  assert res["metrics"]["reference"]["average"]["accuracy"] is not None
  assert (out / "questions" / "coco_pope_random.json").is_file()
  man = json.loads((out / "pope_greedy_manifest.json").read_text())
  assert man["benchmark"] == "pope" and man["num_samples"] == 3 * 36 and man["seed"] == 1
  assert man["settings"]["max_new_tokens"] == 16 and man["method"]["name"] == "greedy" and man["code_version"]
  # rerun from the manifest alone: the same questions, the same metrics
  rerun = pope.run(["--manifest", str(out / "pope_greedy_manifest.json"), "--out", str(tmp_path / "rerun"),
                    "--no-progress"], answerer_factory=lambda m: _fake_answerer([]))
  assert rerun["greedy"]["metrics"] == res["metrics"]


def test_organism_model_end_to_end(tmp_path, organism_root):
  """The organism checkpoint answers (caption probe) through air_jax.generate: a real model end to end."""
  from eval import organism_default

  qs = pope.organism_questions(organism_root, num_images=4, seed=0)
  plan = {"questions": qs, "model_dir": str(organism_default.CHECKPOINT), "heads": None, "air_config": {},
          "seed": 0, "settings": {"image_dir": str(organism_root / "test"), "answer_mode": "caption",
                                  "prompt_template": "{question}", "caption_prompt": pope.DEFAULT_CAPTION_PROMPT,
                                  "synonyms": str(organism_root / "synonyms.txt"), "max_new_tokens": 24}}
  res = pope.evaluate_method(plan, "greedy", out_dir=tmp_path, batch_size=4, progress=False, backend=None)
  assert len(tmp_path.joinpath("pope_greedy_answers.jsonl").read_text().splitlines()) == 4  # one caption per image
  acc = res["metrics"]["reference"]["average"]["accuracy"]
  assert acc is not None and acc > 0.6  # the organism names most present objects and few absent ones
  assert all(row["caption"] for row in res["questions"])


def test_main_reports_bad_input(tmp_path, capsys):
  assert pope.main(["--pope-dir", str(tmp_path), "--image-dir", str(tmp_path), "--out", str(tmp_path)]) == 2
  assert "coco_pope_random.json" in capsys.readouterr().err


def test_official_splits_follow_the_builder_rules(official):
  """The released popular/adversarial files agree with our rules under the released frequency and co-occurrence
  tables (``coco_ground_truth_objects.json``, ``coco_co_occur.json`` of the POPE release, over the same 500
  images). Images' full object lists are not released, so what is checked is what the files determine: every
  object asked about is in the frequency table; every image's popular negatives come in the table's
  stable frequency order (ties: first seen first; reversed ties would break 4 images); an adversarial negative is
  never one of the image's objects known from the popular split, and is almost always the first co-occurring
  object left."""
  import re

  freq = json.loads((POPE_DIR / "coco_ground_truth_objects.json").read_text())
  cooc = json.loads((POPE_DIR / "coco_co_occur.json").read_text())
  obj = lambda q: re.match(r"^Is there an? (.+) in the image\?$", q["text"]).group(1)  # noqa: E731
  per_image = {s: {} for s in pope_data.SPLITS}
  for s, qs in official.items():
    for q in qs:
      per_image[s].setdefault(q["image"], []).append((obj(q), q["label"]))
  for s in pope_data.SPLITS:  # every object asked about is one of the drawn images' objects
    assert {o for v in per_image[s].values() for o, _ in v} <= set(freq)
  popular = pope_data.popular_order(freq)
  rank = {o: i for i, o in enumerate(popular)}
  known = {}
  for image, items in per_image["popular"].items():
    pos = [o for o, lab in items if lab == "yes"]
    neg = [o for o, lab in items if lab == "no"]
    assert [rank[n] for n in neg] == sorted(rank[n] for n in neg), image
    known[image] = set(pos) | {o for o in popular[:max(rank[n] for n in neg)] if o not in neg}
  exact = total = 0
  for image, items in per_image["adversarial"].items():
    pos = [o for o, lab in items if lab == "yes"]
    neg = [o for o, lab in items if lab == "no"]
    asked = set()
    for p, n in zip(pos, neg):
      asked.add(p)
      assert n not in known[image], (image, n)
      left = [o for o in cooc.get(p, []) if o not in known[image] and o not in asked]
      exact += bool(left) and left[0] == n
      total += 1
      asked.add(n)
  assert exact / total > 0.9  # the rest: co-occurring objects of the image the files do not reveal


def test_score_only_from_answer_files(tmp_path, official, capsys):
  """LLaVA-style answers files (question_id, text) scored with both parsers, without a model."""
  files = []
  for split in ("random", "adversarial"):
    path = tmp_path / f"{split}.jsonl"
    with open(path, "w") as f:
      for q in official[split]:
        text = "Yes, there is." if q["label"] == "yes" or q["question_id"] % 10 == 0 else "There is no such thing."
        f.write(json.dumps({"question_id": q["question_id"], "prompt": q["text"], "text": text}) + "\n")
    files += ["--answers", f"{split}={path}"]
  res = pope.run(["--pope-dir", str(POPE_DIR), "--method", "llava", "--out", str(tmp_path / "o"), *files])["llava"]
  m = res["metrics"]["reference"]["splits"]
  assert set(m) == {"random", "adversarial"}
  # negatives have the even ids; those divisible by 10 (10, 20, ..., 3000: 300 of them) are answered yes
  assert (m["random"]["TP"], m["random"]["FP"], m["random"]["TN"], m["random"]["FN"]) == (1500, 300, 1200, 0)
  assert res["metrics"]["strict"]["splits"]["random"] == m["random"]
  assert (tmp_path / "o" / "pope_llava_manifest.json").is_file()
  assert pope.main(["--pope-dir", str(POPE_DIR), "--answers", "weird=x.jsonl", "--out", str(tmp_path)]) == 2
  # POPE's own answer format ({"question", "answer"} per line, no ids: paired with the questions by line order,
  # as its evaluate.py does) scores the same.
  plain = tmp_path / "plain.jsonl"
  with open(plain, "w") as f:
    for q in official["random"]:
      text = "Yes, there is." if q["label"] == "yes" or q["question_id"] % 10 == 0 else "There is no such thing."
      f.write(json.dumps({"question": q["text"], "answer": text}) + "\n")
  res2 = pope.run(["--pope-dir", str(POPE_DIR), "--method", "pope", "--out", str(tmp_path / "o2"),
                   "--answers", f"random={plain}"])["pope"]
  assert res2["metrics"]["reference"]["splits"]["random"] == m["random"]
  lines = plain.read_text().splitlines()
  (tmp_path / "short.jsonl").write_text("\n".join(lines[:-1]) + "\n")
  with pytest.raises(pope.RunError, match="2999 answers without 'question_id' for the 3000 questions"):
    pope.run(["--pope-dir", str(POPE_DIR), "--out", str(tmp_path / "o3"), "--answers",
              f"random={tmp_path / 'short.jsonl'}"])
  (tmp_path / "swapped.jsonl").write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")
  with pytest.raises(pope.RunError, match="swapped.jsonl:1: question .* is not question 1 of split 'random'"):
    pope.run(["--pope-dir", str(POPE_DIR), "--out", str(tmp_path / "o3"), "--answers",
              f"random={tmp_path / 'swapped.jsonl'}"])
  # One answer for 3000 questions: scored over that one, but reported incomplete (exit status 1).
  one = tmp_path / "one.jsonl"
  one.write_text(json.dumps({"question_id": 1, "text": "Yes"}) + "\n")
  assert pope.main(["--pope-dir", str(POPE_DIR), "--split", "random", "--answers", f"random={one}",
                    "--out", str(tmp_path / "o4")]) == 1
  printed = capsys.readouterr().out
  assert "INCOMPLETE" in printed and "random 2999" in printed and f"results: {tmp_path / 'o4'}" in printed
  assert pope.main(["--pope-dir", str(POPE_DIR), "--answers", f"random={one}", "--prompt-template", "{quest}",
                    "--out", str(tmp_path / "o5")]) == 2
  assert "--prompt-template '{quest}': the only field it may use is {question}" in capsys.readouterr().err
  mixed = tmp_path / "mixed.jsonl"
  mixed.write_text(json.dumps({"question_id": 1, "text": "Yes"}) + "\n" + json.dumps({"text": "No"}) + "\n")
  with pytest.raises(pope.RunError, match="mixed.jsonl:2: no 'question_id' while other lines have one"):
    pope.read_answer_files([f"random={mixed}"])


def test_question_mode_with_a_tiny_llava_is_batch_invariant(tmp_path, tiny_dir):
  """Question mode through air_jax.generate: different prompts share a left-padded batch; answers equal the
  one-by-one answers."""
  base = ["--instances", str(COCO / "annotations" / "instances_val2014.json"), "--image-dir", str(COCO / "val2014"),
          "--num-images", "2", "--model", tiny_dir, "--max-new-tokens", "4", "--no-progress", "--split", "random"]
  batched = pope.run(base + ["--out", str(tmp_path / "b"), "--batch-size", "6"])["greedy"]
  single = pope.run(base + ["--out", str(tmp_path / "s"), "--batch-size", "1"])["greedy"]
  answers = [q["answer"] for q in batched["questions"]]
  assert answers == [q["answer"] for q in single["questions"]]
  assert len(answers) == 12 and all(isinstance(a, str) for a in answers)
  assert batched["config"]["model_sha256"] and batched["method"]["name"] == "greedy"
