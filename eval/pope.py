"""POPE evaluation CLI: yes/no object probing (random, popular, adversarial), any method, batched, resumable.

  python -m eval.pope --pope-dir DIR --image-dir coco/val2014 --model DIR --method greedy,air_star --heads H
  python -m eval.pope --instances coco/annotations/instances_val2014.json --image-dir coco/val2014 --model DIR
  python -m eval.pope --manifest results/pope_greedy_manifest.json --out rerun       # rerun from a manifest
  python -m eval.pope --pope-dir DIR --answers random=a.jsonl --answers popular=b.jsonl --method llava  # score only
  python -m eval.pope                           # the embedded organism: its own three splits, greedy and AIR

Questions come from the official files (``<pope-dir>/coco_pope_{random,popular,adversarial}.json``) or are built
from COCO-format instance annotations with POPE's sampling (``eval.pope_data``, seeded; the built files are
written to ``<out>/questions/``). Each distinct (image, prompt) is answered once per method and appended to
``<out>/pope_<method>_answers.jsonl`` (a rerun resumes). Answers are parsed by the reference parser and by a
stricter one, reported side by side (reference first); ``<out>/pope_<method>.json`` holds accuracy, precision,
recall, F1 and yes-ratio per split and averaged, every question with its answer, and the configuration;
``<out>/pope_<method>_manifest.json`` holds the exact questions and settings (rerun with ``--manifest``).

Answer modes. ``question`` (default) asks the POPE question. ``caption`` asks the caption prompt once per image
and answers "Yes" when the caption names the object (its category under the CHAIR vocabulary), else "No": the
organism was trained to caption only (it answers any question with a caption), so its POPE uses this probe.
The organism's splits come from its scene generator (``organism_questions``): labels are true by construction,
random negatives come from all 24 classes, and the adversarial negative of a positive is first the absent member
of its co-occurrence group.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from air_jax.atomic import atomic_write_json
from eval import manifest as manifest_lib
from eval import pope_data
from eval.cli import check_output_dir, releases_output_locks
from eval.runner import RunError, answer_samples, make_answerer, method_record

log = logging.getLogger("eval.pope")

DEFAULT_CAPTION_PROMPT = "Please describe this image in detail."
ANSWER_MODES = ("question", "caption")


# ---------------------------------------------------------------------------------------------------------
# The organism's splits


def organism_questions(root: str | Path, *, split: str = "test", num_images: int | None = None, seed: int = 0,
                       sample_num: int = 3) -> dict[str, list[dict[str, Any]]]:
  """POPE splits over the organism's scenes (``<root>/annotations/scenes_<split>.json``).

  Scenes with at least ``sample_num`` objects are eligible; ``num_images`` of them (default all) are drawn with
  ``random.Random(seed)``, positives are ``sample_num`` of each scene's objects drawn from the same stream (the
  scene lists objects group first, so "the first three" would always be group members). Negatives: random over
  all classes; popular by frequency over the drawn scenes; adversarial: the positive's absent group partners
  first, then POPE's co-occurrence rule.
  """
  from organism.vocab import CLASS_NAMES, GROUP_OF

  path = Path(root) / "annotations" / f"scenes_{split}.json"
  if not path.is_file():
    raise FileNotFoundError(f"organism scenes not found: {path}")
  scenes = json.loads(path.read_text(encoding="utf-8"))["scenes"]
  records = [{"image": s["file_name"], "image_id": s["image_id"], "objects": [o["name"] for o in s["objects"]],
              "expected_absent": s["expected_absent"]} for s in scenes]
  eligible = [r for r in records if len(r["objects"]) >= sample_num]
  n = len(eligible) if num_images is None else num_images
  if n > len(eligible):
    raise pope_data.PopeDataError(f"only {len(eligible)} organism scenes of {path} have at least {sample_num} "
                                  f"objects; asked for {n}")
  rng = random.Random(seed)
  drawn = rng.sample(eligible, n)
  chosen = {r["image"]: rng.sample(r["objects"], sample_num) for r in drawn}
  cooc = pope_data.co_occurrence(drawn)
  adversarial = {}
  for name in CLASS_NAMES:
    partners = [m for m in GROUP_OF.get(name, ()) if m != name]
    adversarial[name] = partners + [o for o in cooc.get(name, []) if o not in partners]
  common = dict(sample_num=sample_num, pool=list(CLASS_NAMES), positives=lambda r: chosen[r["image"]])
  return {
    "random": pope_data.build_split(drawn, "random", rng, **common),
    "popular": pope_data.build_split(drawn, "popular", rng, **common),
    "adversarial": pope_data.build_split(drawn, "adversarial", rng, co_occur=adversarial, **common),
  }


# ---------------------------------------------------------------------------------------------------------
# Answering and scoring


def _sample_id(image: str, prompt: str) -> str:
  return f"{image}\t{prompt}"


def make_samples(questions: Mapping[str, Sequence[Mapping[str, Any]]], image_dir: Path, *, answer_mode: str,
                 prompt_template: str, caption_prompt: str) -> tuple[list[dict], Callable[[Mapping], str]]:
  """Distinct model calls of all splits, and ``key(question) -> sample id``."""
  if answer_mode == "caption":
    key = lambda q: _sample_id(q["image"], caption_prompt)  # noqa: E731
    prompt = lambda q: caption_prompt  # noqa: E731
  else:
    key = lambda q: _sample_id(q["image"], prompt_template.format(question=q["text"]))  # noqa: E731
    prompt = lambda q: prompt_template.format(question=q["text"])  # noqa: E731
  samples, seen = [], set()
  for qs in questions.values():
    for q in qs:
      k = key(q)
      if k not in seen:
        seen.add(k)
        samples.append({"id": k, "image": str(image_dir / q["image"]), "prompt": prompt(q)})
  return samples, key


def caption_answer(caption: str, obj: str, vocab) -> str:
  """"Yes" when the caption names the object's category (CHAIR vocabulary), else "No"."""
  from eval.chair_metric import caption_objects

  category = vocab.category_of(obj)
  if category is None:
    raise RunError(f"object {obj!r} is not in the CHAIR vocabulary; pass --synonyms with a line for it")
  return "Yes" if category in caption_objects(caption, vocab) else "No"


def score_questions(questions: Mapping[str, Sequence[Mapping[str, Any]]], answer_of: Callable[[Mapping], str | None]
                    ) -> tuple[dict[str, Any], list[dict]]:
  """Metrics per split and averaged, under both parsers, and the per-question records.

  ``answer_of(question)`` returns the answer text, or None when the question has no answer (its image was
  unreadable): such questions are left out of the scores and counted under ``unanswered``.
  """
  per_split: dict[str, dict[str, Any]] = {p: {} for p in pope_data.PARSERS}
  rows, unanswered = [], {}
  for split, qs in questions.items():
    labels, preds = [], {p: [] for p in pope_data.PARSERS}
    missing = 0
    for q in qs:
      text = answer_of(q)
      row = {"split": split, "question_id": q["question_id"], "image": q["image"], "text": q["text"],
             "label": q["label"], "answer": text}
      if text is None:
        missing += 1
      else:
        labels.append(q["label"])
        for name, parse in pope_data.PARSERS.items():
          row[name] = parse(text)
          preds[name].append(row[name])
      rows.append(row)
    unanswered[split] = missing
    for name in pope_data.PARSERS:
      per_split[name][split] = pope_data.score(labels, preds[name])
  metrics = {name: {"splits": per_split[name], "average": pope_data.average(per_split[name])}
             for name in pope_data.PARSERS}
  metrics["unanswered"] = unanswered
  return metrics, rows


def _model_dir(value: str | None) -> str | None:
  """--model as a local directory (a Hugging Face repository id is resolved), None when answers are given."""
  from eval.cli import resolve_model_flag

  return None if value is None else resolve_model_flag(value)


def evaluate_method(plan: Mapping[str, Any], method: str, *, answerer=None, out_dir: Path, batch_size: int,
                    progress: bool, backend: str | None) -> dict[str, Any]:
  """Answers and scores every split for one method; writes answers, results and manifest."""
  started = time.time()
  settings, questions = plan["settings"], plan["questions"]
  overrides = plan["air_config"].get(method)
  mrec = method_record(method, plan["heads"], overrides)
  model_dir = plan["model_dir"]
  image_dir = Path(settings["image_dir"])
  samples, key = make_samples(questions, image_dir, answer_mode=settings["answer_mode"],
                              prompt_template=settings["prompt_template"], caption_prompt=settings["caption_prompt"])
  model_sha = manifest_lib.directory_hash(model_dir) if model_dir else None
  if answerer is None:
    if not model_dir:
      raise RunError("--model DIR is required to answer questions")
    answerer = make_answerer(model_dir, method, max_new_tokens=settings["max_new_tokens"], backend=backend,
                             heads=plan["heads"], overrides=overrides)
  meta = {"method": method, "max_new_tokens": settings["max_new_tokens"], "model_sha256": model_sha,
          "answer_mode": settings["answer_mode"]}
  answers, skipped = answer_samples(samples, answerer, out_dir / f"pope_{method}_answers.jsonl", meta=meta,
                                    batch_size=batch_size, progress=progress)
  vocab = None
  if settings["answer_mode"] == "caption":
    from eval.chair_metric import Vocabulary

    vocab = Vocabulary.from_file(settings.get("synonyms"))

  def answer_of(q):
    record = answers.get(key(q))
    if record is None:
      return None
    return caption_answer(record["answer"], q["object"], vocab) if vocab is not None else record["answer"]

  metrics, rows = score_questions(questions, answer_of)
  if vocab is not None:
    for row, q in zip(rows, (q for qs in questions.values() for q in qs)):
      record = answers.get(key(q))
      row["caption"] = None if record is None else record["answer"]
  result = {"benchmark": "pope", "method": mrec, "metrics": metrics, "skipped": skipped, "questions": rows,
            "config": {**settings, "model_dir": model_dir, "model_sha256": model_sha, "seed": plan.get("seed"),
                       "code_version": manifest_lib.code_version(), "seconds": round(time.time() - started, 3)}}
  atomic_write_json(out_dir / f"pope_{method}.json", result, indent=1, ensure_ascii=False)
  samples_list = [{"split": s, **q} for s, qs in questions.items() for q in qs]
  man = manifest_lib.build("pope", samples=samples_list, method=mrec, settings=settings, model_dir=model_dir,
                           seed=plan.get("seed"))
  manifest_lib.write(manifest_lib.manifest_path(out_dir, "pope", method), man)
  return result


# ---------------------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m eval.pope", description=__doc__.splitlines()[0])
  src = p.add_argument_group("questions (one source; none: the embedded organism)")
  src.add_argument("--pope-dir", help="directory with the official <dataset>_pope_{random,popular,adversarial}.json")
  src.add_argument("--dataset", default="coco", help="file name prefix in --pope-dir (default coco)")
  src.add_argument("--instances", help="build the splits from this COCO-format instances JSON (POPE's sampling)")
  src.add_argument("--manifest", help="rerun exactly the questions and settings of this POPE manifest")
  p.add_argument("--image-dir", help="directory of the images named in the questions")
  p.add_argument("--num-images", type=int, default=None, help="images drawn when building (default 500)")
  p.add_argument("--sample-num", type=int, default=3, help="positives (and negatives) per image when building")
  p.add_argument("--seed", type=int, default=0, help="builder seed")
  p.add_argument("--split", action="append", default=None, help="only these splits (repeat or comma-separate)")
  p.add_argument("--answers", action="append", default=None, metavar="SPLIT=FILE",
                 help="score existing answers instead of generating: JSONL with question_id and text (LLaVA), or "
                      "question and answer without ids (POPE's format, paired with the split's questions by line "
                      "order); repeat per split; --method names them")
  p.add_argument("--model", help="checkpoint directory or Hugging Face repository id (org/name[@revision])")
  p.add_argument("--method", action="append", default=None, help="a registered decoding method "
                 "(air_jax.methods.names(): greedy, air, air_star, adhh, vcd, dola, pai, farsight, opera, halc); "
                 "repeat or comma-separate (default greedy)")
  p.add_argument("--heads", help="heads JSON for the AIR/AD-HH presets")
  p.add_argument("--air-config", help="JSON {method: {AIRConfig field: value}} overriding the presets")
  p.add_argument("--max-new-tokens", type=int, default=None, help="default 16 (64 in caption mode)")
  p.add_argument("--prompt-template", default="{question}",
                 help="the prompt around each question, e.g. '{question}\\nAnswer the question using a single "
                      "word or phrase.' (LLaVA-1.5's POPE prompt)")
  p.add_argument("--answer-mode", choices=ANSWER_MODES, default=None, help="question (default) or caption probe")
  p.add_argument("--caption-prompt", default=DEFAULT_CAPTION_PROMPT)
  p.add_argument("--synonyms", help="CHAIR vocabulary for --answer-mode caption (default COCO)")
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--backend", choices=("cpu", "gpu", "tpu"), default=None)
  p.add_argument("--out", default="results")
  p.add_argument("--no-progress", action="store_true")
  return p


def _split_list(values: Sequence[str] | None) -> list[str]:
  out = [m.strip() for v in values or () for m in v.split(",") if m.strip()]
  unknown = [s for s in out if s not in pope_data.SPLITS]
  if unknown:
    raise RunError(f"unknown split(s) {unknown}; expected {', '.join(pope_data.SPLITS)}")
  return out


def _read_air_config(path: str | None) -> dict[str, dict]:
  if path is None:
    return {}
  from eval.chair import EvalError, read_air_config

  try:
    return read_air_config(path)
  except EvalError as e:
    raise RunError(str(e)) from e


def make_plan(args: argparse.Namespace) -> dict[str, Any]:
  """Questions, settings, model, methods from the arguments (or a manifest, or the organism defaults)."""
  if args.manifest:
    man = manifest_lib.read(args.manifest, "pope")
    questions: dict[str, list] = {}
    for s in man["samples"]:
      questions.setdefault(s["split"], []).append({k: v for k, v in s.items() if k != "split"})
    method = man["method"]
    model_dir = _model_dir(args.model or man["model_dir"])  # a recorded hub snapshot resolves to its commit
    for w in manifest_lib.check_model(man, model_dir, args.manifest):
      log.warning("%s", w)
    return {"questions": questions, "settings": man["settings"], "model_dir": model_dir,
            "methods": [method["name"]], "heads": method.get("heads"),
            "air_config": {method["name"]: method.get("overrides") or {}}, "seed": man["seed"]}
  sources = [x for x in (args.pope_dir, args.instances) if x]
  if len(sources) > 1:
    raise RunError("give one question source: --pope-dir or --instances")
  try:
    args.prompt_template.format(question="?")
  except (KeyError, IndexError, ValueError) as e:
    raise RunError(f"--prompt-template {args.prompt_template!r}: the only field it may use is {{question}} "
                   f"(write other braces doubled, {{{{ }}}}); {type(e).__name__}: {e}") from None
  settings = {"prompt_template": args.prompt_template, "caption_prompt": args.caption_prompt,
              "answer_mode": args.answer_mode or "question", "synonyms": args.synonyms}
  seed = None
  if not sources:
    if args.model is not None or args.image_dir is not None:
      raise RunError("--pope-dir or --instances is required with --model/--image-dir")
    from eval import organism_default

    root = organism_default.ensure_dataset(Path(args.out) / "organism_data")
    questions = organism_questions(root, num_images=args.num_images, seed=args.seed, sample_num=args.sample_num)
    args.model = str(organism_default.CHECKPOINT)
    args.image_dir = str(root / "test")
    args.method = args.method or ["greedy,air"]
    args.heads = args.heads or str(organism_default.HEADS)
    args.air_config = args.air_config or str(organism_default.AIR_CONFIG)
    settings.update(answer_mode=args.answer_mode or "caption", synonyms=args.synonyms or str(root / "synonyms.txt"),
                    source="organism", organism_root=str(root))
    seed = args.seed
  elif args.pope_dir:
    files = pope_data.split_files(args.pope_dir, args.dataset)
    questions = {s: pope_data.read_questions(f) for s, f in files.items()}
    settings.update(source="official", pope_dir=str(args.pope_dir), dataset=args.dataset)
  else:
    records = pope_data.objects_from_instances(args.instances)
    questions = pope_data.build_splits(records, num_images=500 if args.num_images is None else args.num_images,
                                       seed=args.seed, sample_num=args.sample_num)
    for s, qs in questions.items():
      pope_data.write_questions(Path(args.out) / "questions" / f"{args.dataset}_pope_{s}.json", qs)
    settings.update(source="built", instances=str(args.instances))
    seed = args.seed
  if args.image_dir is None:
    if not args.answers:
      raise RunError("--image-dir DIR (the images the questions name) is required")
    args.image_dir = "."
  if settings["answer_mode"] == "caption":
    _attach_objects(questions)
  only = _split_list(args.split)
  if only:
    questions = {s: questions[s] for s in only}
  if settings.get("synonyms"):
    settings["synonyms"] = str(Path(settings["synonyms"]).resolve())
  settings.update(image_dir=str(Path(args.image_dir).resolve()), max_new_tokens=args.max_new_tokens or (
    64 if settings["answer_mode"] == "caption" else 16), splits=list(questions))
  if settings["max_new_tokens"] < 1:
    raise RunError(f"--max-new-tokens must be at least 1, got {settings['max_new_tokens']}")
  methods = [m.strip() for v in args.method or ["greedy"] for m in v.split(",") if m.strip()]
  if len(set(methods)) != len(methods):
    raise RunError(f"--method lists a method twice: {methods}")
  return {"questions": questions, "settings": settings, "model_dir": _model_dir(args.model), "methods": methods,
          "heads": args.heads, "air_config": _read_air_config(args.air_config), "seed": seed}


def _attach_objects(questions: Mapping[str, list[dict]]) -> None:
  """Caption mode needs each question's object; official files only have the text: recover it from there."""
  import re

  pattern = re.compile(r"^Is there an? (.+) in the image\?$")
  for qs in questions.values():
    for q in qs:
      if "object" not in q:
        m = pattern.match(q["text"])
        if not m:
          raise RunError(f"question {q['question_id']}: cannot find the object in {q['text']!r} for caption mode")
        q["object"] = m.group(1)


def format_table(results: Mapping[str, Mapping[str, Any]]) -> str:
  """Per method and split: accuracy, precision, recall, F1, yes-ratio under the reference | strict parsers."""
  header = f"{'method':<10}{'split':<13}" + "".join(f"{m:>16}" for m in ("acc", "prec", "rec", "F1", "yes")) + \
           f"{'unparsed':>10}"
  lines = [header + "   (reference | strict, %)", "-" * len(header)]
  fmt = lambda v: "  -  " if v is None else f"{100 * v:5.1f}"  # noqa: E731
  for method, result in results.items():
    m = result["metrics"]
    splits = list(m["reference"]["splits"]) + ["average"]
    for split in splits:
      ref = m["reference"]["average"] if split == "average" else m["reference"]["splits"][split]
      strict = m["strict"]["average"] if split == "average" else m["strict"]["splits"][split]
      cells = "".join(f"{fmt(ref[k]) + ' | ' + fmt(strict[k]):>16}" for k in pope_data.METRICS)
      unparsed = "" if split == "average" else str(strict["unparsed"])
      lines.append(f"{method:<10}{split:<13}{cells}{unparsed:>10}")
    missing = {k: v for k, v in m.get("unanswered", {}).items() if v}
    if missing:
      lines.append(f"{method}: INCOMPLETE, questions without an answer (left out of the scores): "
                   + ", ".join(f"{k} {v}" for k, v in missing.items()))
  return "\n".join(lines)


def incomplete(results: Mapping[str, Mapping[str, Any]]) -> bool:
  """Whether any method left questions unanswered (its scores are then over part of the benchmark)."""
  return any(v for r in results.values() for v in r["metrics"].get("unanswered", {}).values())


def read_answer_files(specs: Sequence[str]) -> dict[str, dict[Any, str] | list[dict]]:
  """``SPLIT=FILE`` -> split -> question_id -> answer text (key "text" as LLaVA writes, or "answer" as POPE).

  A file whose lines have no ``question_id`` (the official POPE answer format: {"question", "answer"} per line,
  paired with the question file by line order) gives the list of its lines instead; `score_answers` pairs them.
  """
  from eval.captions_io import iter_jsonl

  out: dict[str, Any] = {}
  for spec in specs:
    split, sep, path = spec.partition("=")
    if not sep or split not in pope_data.SPLITS:
      raise RunError(f"--answers {spec!r}: expected SPLIT=FILE with SPLIT one of {', '.join(pope_data.SPLITS)}")
    if not Path(path).is_file():
      raise FileNotFoundError(f"answers file not found: {path}")
    if split in out:
      raise RunError(f"--answers: split {split!r} given twice")
    lines = []
    for n, obj in iter_jsonl(path):
      text = obj.get("text", obj.get("answer"))
      if not isinstance(text, str):
        raise RunError(f"{path}:{n}: an answer needs a string 'text' or 'answer'")
      lines.append({"line": n, "question_id": obj.get("question_id"), "question": obj.get("question"),
                    "text": text, "path": path})
    keyed = [x["question_id"] is not None for x in lines]
    if all(keyed):
      out[split] = {x["question_id"]: x["text"] for x in lines}
    elif not any(keyed):
      out[split] = lines
    else:
      n = lines[keyed.index(False)]["line"]
      raise RunError(f"{path}:{n}: no 'question_id' while other lines have one; give it on every line, or on none "
                     f"(then answers pair with the questions by line order, as POPE's evaluate.py does)")
  return out


def _pair_by_order(split: str, questions: Sequence[Mapping[str, Any]], lines: Sequence[Mapping[str, Any]]
                   ) -> dict[Any, str]:
  """question_id -> answer for an answer file without ids: line i answers question i of the split."""
  path = lines[0]["path"] if lines else "?"
  if len(lines) != len(questions):
    raise RunError(f"{path}: {len(lines)} answers without 'question_id' for the {len(questions)} questions of "
                   f"split {split!r}: answers pair with questions by line order, so the counts must match")
  for q, a in zip(questions, lines):
    if a["question"] is not None and a["question"].strip() != str(q["text"]).strip():
      raise RunError(f"{path}:{a['line']}: question {a['question']!r} is not question {q['question_id']} of split "
                     f"{split!r} ({q['text']!r}): the answers are not in the question file's order")
  return {q["question_id"]: a["text"] for q, a in zip(questions, lines)}


def score_answers(plan: Mapping[str, Any], answers: Mapping[str, Mapping[Any, str]], label: str, specs: Sequence[str],
                  out_dir: Path) -> dict[str, Any]:
  """Scores answer files (no model); writes the results and a manifest like a generating run."""
  questions = {s: qs for s, qs in plan["questions"].items() if s in answers}
  if not questions:
    raise RunError(f"no --answers for any of the splits {list(plan['questions'])}")
  answers = {s: _pair_by_order(s, questions[s], a) if isinstance(a, list) else a for s, a in answers.items()
             if s in questions}
  q_split = {id(q): s for s, qs in questions.items() for q in qs}
  metrics, rows = score_questions(questions, lambda q: answers[q_split[id(q)]].get(q["question_id"]))
  mrec = {"name": label, "answers": [str(Path(s.partition("=")[2]).resolve()) for s in specs]}
  result = {"benchmark": "pope", "method": mrec, "metrics": metrics, "skipped": [], "questions": rows,
            "config": {**plan["settings"], "code_version": manifest_lib.code_version()}}
  atomic_write_json(out_dir / f"pope_{label}.json", result, indent=1, ensure_ascii=False)
  samples_list = [{"split": s, **q} for s, qs in questions.items() for q in qs]
  manifest_lib.write(manifest_lib.manifest_path(out_dir, "pope", label), manifest_lib.build(
    "pope", samples=samples_list, method=mrec, settings=plan["settings"], model_dir=None, seed=plan.get("seed")))
  return result


@releases_output_locks
def run(argv: Sequence[str] | None = None, answerer_factory: Callable[[str], Any] | None = None
        ) -> dict[str, dict[str, Any]]:
  """Runs POPE; returns method -> results (as written). Tests inject ``answerer_factory(method)``."""
  args = build_parser().parse_args(argv)
  plan = make_plan(args)
  out_dir = Path(args.out)
  check_output_dir(out_dir)  # before any work; also keeps a second run off this directory
  if args.batch_size < 1:
    raise RunError(f"--batch-size must be at least 1, got {args.batch_size}")
  if args.answers:
    label = plan["methods"][0] if len(plan["methods"]) == 1 else "answers"
    return {label: score_answers(plan, read_answer_files(args.answers), label, args.answers, out_dir)}
  # every method resolved before any generation, so a bad preset fails before hours of work
  for m in plan["methods"]:
    method_record(m, plan["heads"], plan["air_config"].get(m))
  results = {}
  for m in plan["methods"]:
    answerer = answerer_factory(m) if answerer_factory is not None else None
    results[m] = evaluate_method(plan, m, answerer=answerer, out_dir=out_dir, batch_size=args.batch_size,
                                 progress=not args.no_progress, backend=args.backend)
  return results


def main(argv: Sequence[str] | None = None, answerer_factory=None) -> int:
  """CLI entry point: prints the table, returns the exit status (2 on a user error)."""
  from eval.cli import run_cli

  def body() -> int:
    results = run(argv, answerer_factory)
    print(format_table(results))
    print(f"results: {build_parser().parse_args(argv).out}")  # run() parsed the same argv already
    return 1 if incomplete(results) else 0

  return run_cli(body, (RunError, pope_data.PopeDataError, manifest_lib.ManifestError))


if __name__ == "__main__":
  sys.exit(main())
