"""What the judged benchmarks (MMHal-Bench, MM-Vet) share: CLI options, answering, judge set-up, manifests.

A judged run: samples (``{"id", "image", "prompt", ...}``) -> answers from the model (``eval.runner``, resumable
JSONL) or from a responses file -> one judge call per sample (``eval.judges.CachedJudge``: every reply cached on
disk, so an interrupted or repeated run re-asks nothing) -> scores. Judge failures are recorded per sample and
left out of the scores (a rerun retries them); nothing already paid for is lost.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from eval import manifest as manifest_lib
from eval.judges import CachedJudge, make_judge
from eval.runner import RunError, answer_samples, make_answerer, method_record

log = logging.getLogger("eval.judged")


def add_common_args(p: argparse.ArgumentParser, default_max_new_tokens: int = 512) -> None:
  """Model, method, judge and output options."""
  p.add_argument("--data", help="the benchmark's data directory (see the module docstring for its layout)")
  p.add_argument("--responses", help="score this responses file instead of generating answers")
  p.add_argument("--manifest", help="rerun exactly the samples and settings of this manifest")
  p.add_argument("--model", help="checkpoint directory or Hugging Face repository id (to generate answers)")
  p.add_argument("--method", default="greedy", help="a registered decoding method "
                 "(air_jax.methods.names(): greedy, air, air_star, adhh, vcd, ...; default greedy)")
  p.add_argument("--heads", help="heads JSON for the AIR/AD-HH presets")
  p.add_argument("--air-config", help="JSON {method: {AIRConfig field: value}} overriding the presets")
  p.add_argument("--max-new-tokens", type=int, default=default_max_new_tokens)
  p.add_argument("--prompt-template", default="{question}", help="the prompt around each question")
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--backend", choices=("cpu", "gpu", "tpu"), default=None)
  p.add_argument("--judge", choices=("openai", "local"), default="openai",
                 help="openai: an OpenAI-compatible endpoint from AIR_JUDGE_BASE_URL / AIR_JUDGE_MODEL / "
                      "AIR_JUDGE_API_KEY; local: a Hugging Face Llama causal LM run by air-jax (--judge-model DIR)")
  p.add_argument("--judge-model", help="judge model name (openai; default AIR_JUDGE_MODEL or the benchmark's) or "
                                       "directory or Hugging Face repository id (local)")
  p.add_argument("--judge-cache", help="judge cache directory (default <out>/judge_cache)")
  p.add_argument("--out", default="results")
  p.add_argument("--no-progress", action="store_true")


def overrides_for(air_config: str | None, method: str) -> dict[str, Any]:
  """The --air-config overrides of one method ({} without a file)."""
  if air_config is None:
    return {}
  from eval.chair import EvalError, read_air_config

  try:
    return read_air_config(air_config).get(method, {})
  except EvalError as e:
    raise RunError(str(e)) from e


def setup_judge(args: argparse.Namespace, default_model: str, out_dir: Path,
                judge: CachedJudge | None = None) -> CachedJudge:
  """The cached judge of the arguments (or the injected one)."""
  if judge is not None:
    return judge
  import os

  model = args.judge_model
  if args.judge == "openai" and model is None and not os.environ.get("AIR_JUDGE_MODEL"):
    model = default_model
  try:
    return make_judge(args.judge, model=model, cache_dir=args.judge_cache or out_dir / "judge_cache")
  except (ValueError, FileNotFoundError) as e:
    raise RunError(f"--judge {args.judge}: {e}") from e


def answer(samples: Sequence[Mapping[str, Any]], args: argparse.Namespace, benchmark: str, out_dir: Path, *,
           answerer: Callable | None = None) -> tuple[dict[Any, str], list[dict], dict[str, Any], str | None]:
  """Model answers of the samples: (id -> text, skipped, method record, model hash)."""
  overrides = getattr(args, "_manifest_overrides", None)
  if overrides is None:
    overrides = overrides_for(args.air_config, args.method)
  mrec = method_record(args.method, args.heads, overrides)
  if args.model:
    from eval.cli import resolve_model_flag

    args.model = resolve_model_flag(args.model)
  model_sha = manifest_lib.directory_hash(args.model) if args.model else None
  if answerer is None:
    if not args.model:
      raise RunError("--model DIR is required to generate answers (or pass --responses FILE)")
    answerer = make_answerer(args.model, args.method, max_new_tokens=args.max_new_tokens, backend=args.backend,
                             heads=args.heads, overrides=overrides)
  if args.max_new_tokens < 1:
    raise RunError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
  meta = {"method": args.method, "max_new_tokens": args.max_new_tokens, "model_sha256": model_sha}
  records, skipped = answer_samples(samples, answerer, out_dir / f"{benchmark}_{args.method}_answers.jsonl",
                                    meta=meta, batch_size=args.batch_size, progress=not args.no_progress)
  return {k: r["answer"] for k, r in records.items()}, skipped, mrec, model_sha


def apply_manifest(args: argparse.Namespace, benchmark: str) -> dict[str, Any] | None:
  """With --manifest: fills the arguments from it and returns it (its samples are used as they are)."""
  if not args.manifest:
    return None
  man = manifest_lib.read(args.manifest, benchmark)
  s = man["settings"]
  args.data = s.get("data")
  args.model = args.model or man["model_dir"]
  args.method = man["method"]["name"]
  args.heads = man["method"].get("heads")
  args.max_new_tokens = s.get("max_new_tokens", args.max_new_tokens)
  args.prompt_template = s.get("prompt_template", args.prompt_template)
  args.responses = s.get("responses")
  for key in ("num_runs",):
    if key in s and hasattr(args, key):
      setattr(args, key, s[key])
  args._manifest_overrides = man["method"].get("overrides") or {}
  if args.model and not args.responses:  # a recorded hub snapshot of another machine resolves to its commit here
    from eval.cli import resolve_model_flag

    args.model = resolve_model_flag(args.model)
  for w in manifest_lib.check_model(man, args.model if not args.responses else None, args.manifest):
    log.warning("%s", w)
  return man


def write_manifest(out_dir: Path, benchmark: str, label: str, samples: list[dict], mrec: Mapping[str, Any],
                   settings: Mapping[str, Any], model_dir: str | None, judge: CachedJudge) -> Path:
  man = manifest_lib.build(benchmark, samples=samples, method=mrec, settings=settings, model_dir=model_dir,
                           seed=None, judge=judge.identity)
  return manifest_lib.write(manifest_lib.manifest_path(out_dir, benchmark, label), man)
