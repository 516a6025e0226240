"""CHAIR over K image samples (``eval.chair --splits K``) with mean and spread, and CHAIR manifests.

Samples. ``disjoint`` (default): split 0 is the usual sample (``random.Random(seed).sample(ids, n)``, the
AIR/AD-HH protocol), splits 1..K-1 are drawn without overlap from the remaining images with
``random.Random(seed).sample(rest, (K - 1) * n)`` cut in order. ``seeded``: split i is
``random.Random(seed + i).sample(ids, n)`` (samples may overlap). Every image of every split is captioned once
per method; each split is scored on its own and the metrics are summarised by mean and sample standard deviation
(ddof 1) over the splits.

Manifests: ``<out>/chair_<method>_manifest.json`` holds the exact image ids and file names (with their split),
the resolved method, the model hash, the code version and the CLI settings (paths made absolute), so
``python -m eval.rerun MANIFEST`` runs the same evaluation again and checks that it draws the same images.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from eval import manifest as manifest_lib
from eval.runner import mean_std

MODES = ("disjoint", "seeded")
SUMMARY_METRICS = ("CHAIRs", "CHAIRi", "Recall", "Precision", "F1", "avg_len_words")
PATH_ARGS = ("coco_root", "model", "heads", "air_config", "synonyms", "cache_dir")


def make_splits(ids: Sequence[Any], num_images: int, k: int, seed: int, mode: str = "disjoint") -> list[list[Any]]:
  """K samples of ``num_images`` image ids (see the module docstring).

  Raises:
    ValueError: K < 1, an unknown mode, or too few images for K disjoint samples.
  """
  if k < 1:
    raise ValueError(f"--splits must be at least 1, got {k}")
  if mode not in MODES:
    raise ValueError(f"--split-mode must be one of {MODES}, got {mode!r}")
  if num_images < 1 or num_images > len(ids):
    raise ValueError(f"--num-images {num_images} must be between 1 and the {len(ids)} images of the split")
  first = random.Random(seed).sample(list(ids), num_images)
  if mode == "seeded":
    return [first] + [random.Random(seed + i).sample(list(ids), num_images) for i in range(1, k)]
  if k * num_images > len(ids):
    raise ValueError(f"--splits {k} disjoint samples of {num_images} images need {k * num_images} images; the "
                     f"split has {len(ids)} (lower --num-images or use --split-mode seeded)")
  taken = set(first)
  rest = random.Random(seed).sample([i for i in ids if i not in taken], (k - 1) * num_images)
  return [first] + [rest[j * num_images:(j + 1) * num_images] for j in range(k - 1)]


def union(splits: Sequence[Sequence[Any]]) -> list[Any]:
  """Every image of the splits once, in first-appearance order."""
  return list(dict.fromkeys(i for s in splits for i in s))


def score_splits(score: Callable[[list[Any]], Mapping[str, Any]], splits: Sequence[Sequence[Any]],
                 mode: str) -> dict[str, Any]:
  """Scores each split (``score(ids) -> CHAIR result``) and summarises its overall metrics."""
  per_split = [dict(score(list(s))["overall_metrics"]) for s in splits]
  summary = {m: mean_std([r[m] for r in per_split]) for m in SUMMARY_METRICS if all(m in r for r in per_split)}
  return {"mode": mode, "k": len(splits), "num_images": [len(s) for s in splits], "per_split": per_split,
          "summary": summary}


def format_summary(results: Mapping[str, Mapping[str, Any]]) -> str:
  """One line per method: mean +- std over the splits (percentages except length)."""
  lines = []
  for label, result in results.items():
    sp = result.get("splits")
    if not sp:
      continue
    cells = []
    for m in SUMMARY_METRICS:
      s = sp["summary"].get(m)
      if s is None or s["mean"] is None:
        continue
      scale = 1 if m == "avg_len_words" else 100
      std = "" if s["std"] is None else f" +- {scale * s['std']:.1f}"
      cells.append(f"{m} {scale * s['mean']:.1f}{std}")
    lines.append(f"{label:<14}{sp['k']} {sp['mode']} splits: " + ", ".join(cells))
  return "\n".join(lines)


def cli_settings(args: argparse.Namespace) -> dict[str, Any]:
  """The parsed CLI arguments as JSON, with path arguments made absolute (so a manifest reruns anywhere)."""
  out = {}
  for k, v in vars(args).items():
    if k in PATH_ARGS and isinstance(v, str):
      v = str(Path(v).resolve())
    out[k] = v
  return out


def write_manifest(out_dir: Path, label: str, args: argparse.Namespace, sample: Sequence[Any],
                   file_names: Mapping[Any, str], splits: Sequence[Sequence[Any]] | None,
                   overrides: Mapping[str, Any] | None) -> Path:
  """``<out>/chair_<label>_manifest.json`` for a generating run."""
  from eval.runner import RunError, method_record

  split_of = {}
  for n, s in enumerate(splits or [sample]):
    for i in s:
      split_of.setdefault(i, n)
  samples = [{"image_id": i, "file_name": file_names[i], "split": split_of[i]} for i in sample]
  settings = {"cli": cli_settings(args), "prompt": args.prompt, "max_new_tokens": args.max_new_tokens,
              "splits": [list(s) for s in splits] if splits else None}
  try:
    method = method_record(label, args.heads, overrides)
  except RunError as e:  # e.g. a captions label that is no method: recorded, not fatal
    method = {"name": label, "heads": args.heads, "overrides": dict(overrides or {}), "hyperparameters": None,
              "unresolved": str(e)}
  man = manifest_lib.build("chair", samples=samples, method=method,
                           settings=settings, model_dir=args.model, seed=args.seed)
  return manifest_lib.write(manifest_lib.manifest_path(out_dir, "chair", label), man)
