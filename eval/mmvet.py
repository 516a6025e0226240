"""MM-Vet (Yu et al., ICML 2024) with its official grading prompt and scores per capability.

  python -m eval.mmvet --data DIR --model DIR --method air --heads H --judge openai    # endpoint from AIR_JUDGE_*
  python -m eval.mmvet --data DIR --responses llava.json --judge local --judge-model path/to/llama --num-runs 5
  python -m eval.mmvet --manifest results/mmvet_greedy_manifest.json --out rerun

Data (``--data DIR``, the unzipped mm-vet.zip): ``DIR/mm-vet.json`` = {id: {"imagename", "capability" (list of
rec/ocr/know/gen/spat/math), "question", "answer"}} and the images at ``DIR/images/<imagename>``. ``--responses``
takes the official results format {id: model answer}.

Reference (``mm-vet_evaluator.py``): the grader gets ``eval/data/mmvet_grader_prompt.txt`` + "\\n" + " | ".join(
[question, answer with " <AND> "/" <OR> " spaced, prediction, ""]) as one user message, max_tokens 3, temperature
0 (gpt-4-0613). The score is ``float(reply.split(" ")[0].strip())`` when it lies in [0, 1]; otherwise the grader
is asked again with "\\nPredict the correctness of the answer (digit): " appended, at temperatures 0, 0.5, 1.0 and
1.5, and after those four retries the score is 0 (the reference makes a fifth call at 2.0 whose reply it never
reads; it is skipped here). Here a NaN reply is not a score (the reference's range check lets "nan" through).
Capability score = sum of the scores of the samples requiring it / their number x 100; the same per capability
integration (the exact set of capabilities, named by joining them with "_" in sorted order) and in total. With
``--num-runs K`` every sample is graded K times (run r is its own cache entry) and the scores are the mean over
runs, with the standard deviation of the total over runs (numpy's, ddof 0, as the reference).
Judge failures (timeouts, HTTP errors) are recorded per sample and left out; the run says it is incomplete.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from air_jax.atomic import atomic_write_json
from eval import judged
from eval import manifest as manifest_lib
from eval.cli import check_output_dir, releases_output_locks, run_cli
from eval.judges import CachedJudge
from eval.runner import RunError

log = logging.getLogger("eval.mmvet")

PROMPT_FILE = Path(__file__).resolve().parent / "data" / "mmvet_grader_prompt.txt"
DEFAULT_JUDGE_MODEL = "gpt-4-0613"
CAPABILITIES = ("rec", "ocr", "know", "gen", "spat", "math")
RETRY_SUFFIX = "\nPredict the correctness of the answer (digit): "
RETRY_TEMPERATURES = (0.0, 0.5, 1.0, 1.5)
MAX_TOKENS = 3


class MMVetDataError(ValueError):
  """A malformed MM-Vet file (the message names the file, the sample and the field)."""


def grader_prompt(sample: Mapping[str, Any], prediction: str, retry: bool = False) -> str:
  """The official grading message for one sample and prediction (``retry``: with the digit reminder)."""
  base = PROMPT_FILE.read_text(encoding="utf-8")
  gt = sample["answer"].replace("<AND>", " <AND> ").replace("<OR>", " <OR> ")
  text = base + "\n" + " | ".join([sample["question"], gt, prediction, ""])
  return text + RETRY_SUFFIX if retry else text


def parse_score(reply: str) -> float | None:
  """The reference's reading: the reply's first space-separated token as a float in [0, 1], else None."""
  try:
    value = float(reply.split(" ")[0].strip())
  except ValueError:
    return None
  return value if math.isfinite(value) and 0.0 <= value <= 1.0 else None


def read_data(path: str | Path) -> dict[str, dict[str, Any]]:
  """``mm-vet.json``, checked."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"MM-Vet metadata not found: {path}")
  try:
    data = json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise MMVetDataError(f"{path}: not valid JSON ({e})") from e
  if not isinstance(data, dict) or not data:
    raise MMVetDataError(f"{path}: expected a non-empty object {{id: sample}}")
  for k, v in data.items():
    if not isinstance(v, dict):
      raise MMVetDataError(f"{path}: sample {k!r} is not an object")
    for f in ("imagename", "capability", "question", "answer"):
      if f not in v:
        raise MMVetDataError(f"{path}: sample {k!r} lacks {f!r}")
    caps = v["capability"]
    if not isinstance(caps, list) or not caps or not all(isinstance(c, str) for c in caps):
      raise MMVetDataError(f"{path}: sample {k!r} 'capability' must be a non-empty list of strings")
    for f in ("imagename", "question", "answer"):
      if not isinstance(v[f], str):
        raise MMVetDataError(f"{path}: sample {k!r} {f!r} must be a string")
  return data


def grade(judge: CachedJudge, sample: Mapping[str, Any], prediction: str, run: int) -> dict[str, Any]:
  """One grading with the reference's retries: {"score", "attempts": [{"reply", "temperature"}], "error"}."""
  attempts = []
  for step, temperature in enumerate((0.0,) + RETRY_TEMPERATURES):
    reply = judge.ask(grader_prompt(sample, prediction, retry=step > 0), temperature=temperature,
                      max_tokens=MAX_TOKENS, run=run)
    if not reply.ok:
      return {"score": None, "attempts": attempts, "error": reply.error}
    attempts.append({"reply": reply.text, "temperature": temperature, "cached": reply.cached})
    value = parse_score(reply.text)
    if value is not None:
      return {"score": value, "attempts": attempts, "error": None}
  return {"score": 0.0, "attempts": attempts, "error": None, "unparsed": True}


def scores(data: Mapping[str, Mapping[str, Any]], grades: Mapping[str, Sequence[float | None]], num_runs: int
           ) -> dict[str, Any]:
  """Per capability, per capability integration and total, x 100, mean over runs; std of the total over runs.

  Samples with a failed grading in a run are left out of that run's sums and counts.
  """
  def integration(caps):
    return "_".join(sorted(set(caps)))

  per_run_cap, per_run_int, totals = [], [], []
  for r in range(num_runs):
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    isums: dict[str, float] = {}
    icounts: dict[str, int] = {}
    total, n = 0.0, 0
    for k, sample in data.items():
      g = grades.get(k)
      if g is None or r >= len(g) or g[r] is None:
        continue
      for c in set(sample["capability"]):
        sums[c] = sums.get(c, 0.0) + g[r]
        counts[c] = counts.get(c, 0) + 1
      key = integration(sample["capability"])
      isums[key] = isums.get(key, 0.0) + g[r]
      icounts[key] = icounts.get(key, 0) + 1
      total += g[r]
      n += 1
    per_run_cap.append({c: 100 * sums[c] / counts[c] for c in sums})
    per_run_int.append({c: 100 * isums[c] / icounts[c] for c in isums})
    totals.append(100 * total / n if n else None)

  def mean_over_runs(dicts):
    keys = sorted({k for d in dicts for k in d}, key=lambda c: (c not in CAPABILITIES, CAPABILITIES.index(c)
                                                                 if c in CAPABILITIES else 0, c))
    return {k: sum(d[k] for d in dicts if k in d) / sum(k in d for d in dicts) for k in keys}

  valid = [t for t in totals if t is not None]
  mean = sum(valid) / len(valid) if valid else None
  std = math.sqrt(sum((t - mean) ** 2 for t in valid) / len(valid)) if valid else None
  return {"capability": mean_over_runs(per_run_cap), "integration": mean_over_runs(per_run_int), "total": mean,
          "std": std, "runs": totals}


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m eval.mmvet", description=__doc__.splitlines()[0])
  judged.add_common_args(p, default_max_new_tokens=512)
  p.add_argument("--num-runs", type=int, default=1, help="gradings per sample (5 in the paper)")
  return p


@releases_output_locks
def run(argv: Sequence[str] | None = None, *, answerer=None, judge: CachedJudge | None = None) -> dict[str, Any]:
  """Runs MM-Vet; returns the results (as written). Tests inject ``answerer`` and ``judge``."""
  args = build_parser().parse_args(argv)
  man = judged.apply_manifest(args, "mmvet")
  if args.num_runs < 1:
    raise RunError(f"--num-runs must be at least 1, got {args.num_runs}")
  if not args.data:
    raise RunError("--data DIR (the unzipped MM-Vet with mm-vet.json and images/) is required")
  out_dir = Path(args.out)
  check_output_dir(out_dir)  # before any work; also keeps a second run off this directory
  started = time.time()
  data = read_data(Path(args.data) / "mm-vet.json")
  if man is not None:
    ids = [s["id"] for s in man["samples"]]
    missing = [i for i in ids if i not in data]
    if missing:
      raise RunError(f"{args.manifest}: samples {missing[:5]} are not in {args.data}/mm-vet.json")
    data = {i: data[i] for i in ids}
  if args.responses:
    try:
      preds = json.loads(Path(args.responses).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
      raise MMVetDataError(f"{args.responses}: cannot read it as JSON ({e})") from e
    if not isinstance(preds, dict):
      raise MMVetDataError(f"{args.responses}: expected an object {{id: answer}}")
    bad = [k for k, v in preds.items() if not isinstance(v, str)]
    if bad:
      raise MMVetDataError(f"{args.responses}: the answers of {bad[:5]} are not strings")
    answers, skipped, model_sha = {k: preds[k] for k in data if k in preds}, [], None
    mrec = {"name": args.method, "responses": str(Path(args.responses).resolve())}
  else:
    samples = [{"id": k, "image": str(Path(args.data) / "images" / v["imagename"]),
                "prompt": args.prompt_template.format(question=v["question"])} for k, v in data.items()]
    answers, skipped, mrec, model_sha = judged.answer(samples, args, "mmvet", out_dir, answerer=answerer)
    atomic_write_json(out_dir / f"mmvet_{args.method}_predictions.json", answers, indent=1, ensure_ascii=False)
  judge = judged.setup_judge(args, DEFAULT_JUDGE_MODEL, out_dir, judge)
  rows, grades, failures, unparsed = [], {}, 0, 0
  for k, sample in data.items():
    row = {"id": k, "capability": sample["capability"], "prediction": answers.get(k), "grades": []}
    if row["prediction"] is None:
      row["status"] = "unanswered"
      rows.append(row)
      continue
    for r in range(args.num_runs):
      g = grade(judge, sample, row["prediction"], r)
      row["grades"].append(g)
      failures += g["error"] is not None
      unparsed += bool(g.get("unparsed"))
    grades[k] = [g["score"] for g in row["grades"]]
    row["status"] = "judge_failed" if any(g["error"] for g in row["grades"]) else "graded"
    rows.append(row)
  metrics = scores(data, grades, args.num_runs)
  unanswered = sum(r["status"] == "unanswered" for r in rows)
  # The official evaluator scores every sample of the benchmark (a missing answer stops it), so a run with
  # unanswered samples is not comparable with published totals: it is reported incomplete.
  metrics.update(judge_failures=failures, unparsed_scored_zero=unparsed, unanswered=unanswered,
                 complete=failures == 0 and unanswered == 0)
  settings = {"data": str(Path(args.data).resolve()),
              "responses": None if not args.responses else str(Path(args.responses).resolve()),
              "prompt_template": args.prompt_template, "max_new_tokens": args.max_new_tokens,
              "num_runs": args.num_runs, "judge_max_tokens": MAX_TOKENS,
              "grader_prompt_sha256": hashlib.sha256(PROMPT_FILE.read_bytes()).hexdigest()}
  result = {"benchmark": "mmvet", "method": mrec, "judge": judge.identity, "metrics": metrics, "skipped": skipped,
            "samples": rows, "config": {**settings, "model_dir": args.model, "model_sha256": model_sha,
                                        "code_version": manifest_lib.code_version(), "judge_calls": judge.calls,
                                        "seconds": round(time.time() - started, 3)}}
  atomic_write_json(out_dir / f"mmvet_{args.method}.json", result, indent=1, ensure_ascii=False)
  samples_list = [{"id": k, "imagename": v["imagename"], "capability": v["capability"], "question": v["question"]}
                  for k, v in data.items()]
  judged.write_manifest(out_dir, "mmvet", args.method, samples_list, mrec, settings,
                        None if args.responses else args.model, judge)
  return result


def _incomplete(m: Mapping[str, Any]) -> str:
  why = []
  if m["judge_failures"]:
    why.append("rerun to retry the failed gradings")
  if m["unanswered"]:
    why.append(f"{m['unanswered']} samples have no answer: the total is over the answered ones only")
  return "  (INCOMPLETE: " + "; ".join(why) + ")"


def format_table(result: Mapping[str, Any]) -> str:
  m = result["metrics"]
  fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
  caps = "  ".join(f"{c} {fmt(v)}" for c, v in m["capability"].items())
  std = "" if m["std"] is None or len(m["runs"]) < 2 else f" +- {m['std']:.1f}"
  lines = [f"MM-Vet  method {result['method']['name']}  judge {result['judge']}",
           f"total {fmt(m['total'])}{std}  |  {caps}",
           f"judge failures {m['judge_failures']}, unparsed (scored 0) {m['unparsed_scored_zero']}, unanswered "
           f"{m['unanswered']}" + ("" if m["complete"] else _incomplete(m))]
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  def body() -> int:
    result = run(argv)
    print(format_table(result))
    print(f"results: {build_parser().parse_args(argv).out}")
    return 0 if result["metrics"]["complete"] else 1

  return run_cli(body, (RunError, MMVetDataError, manifest_lib.ManifestError))


if __name__ == "__main__":
  sys.exit(main())
