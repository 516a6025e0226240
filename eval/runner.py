"""The shared answer loop of the question benchmarks (POPE, MMHal-Bench, MM-Vet): methods, batching, resume.

A benchmark turns its data into *samples* (JSON objects with a unique ``id``, an ``image`` path and a ``prompt``)
and asks ``answer_samples`` to produce one answer per sample. Answers are appended to a JSONL file record by
record (``eval.captions_io.append_record``: flushed and synced), so a crash loses at most the batch in flight; a
rerun skips the samples already answered, after checking that the file was written with the same method, prompt
settings and model. Results JSON files are written atomically by the benchmarks.

``resolve_method`` is the one place that turns a method name into a decoding configuration: any method of the
registry (``air_jax.methods``), as ``eval.chair`` resolves it.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from eval.captions_io import append_record, iter_jsonl, repair_tail

log = logging.getLogger("eval.runner")

# Settings an answers file must share with the run that appends to it.
RESUME_KEYS = ("method", "max_new_tokens", "model_sha256", "answer_mode")

Answerer = Callable[[list, list[str]], list[str]]


class RunError(RuntimeError):
  """A user-facing error of a benchmark run: printed without a traceback, exit status 2."""


# ---------------------------------------------------------------------------------------------------------
# Methods


def _jsonable(value: Any) -> Any:
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, (str, int, float, bool)) or value is None:
    return value
  if hasattr(value, "tolist"):
    return value.tolist()
  return repr(value)


def resolve_method(name: str, heads: str | None = None,
                   overrides: Mapping[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
  """A method name -> (decoding config for ``air_jax.generate``, its resolved hyperparameters as JSON).

  Any method of the registry (``air_jax.methods``: greedy, air, air_star, adhh, vcd, dola, pai, farsight, ...),
  resolved as eval.chair does: ``methods.make(name, run_options={"heads": heads}, **overrides)``.

  Raises:
    RunError: Unknown method, or a preset that rejects the heads/overrides.
  """
  from air_jax import methods

  if name not in methods.names():
    raise RunError(f"unknown method {name!r}; expected one of {', '.join(methods.names())}")
  try:
    cfg = methods.make(name, run_options={"heads": heads}, **dict(overrides or {}))
  except (ValueError, TypeError, FileNotFoundError) as e:
    raise RunError(f"method {name}: {e}") from e
  resolved = methods.hyperparameters(cfg)
  resolved["heads_file"] = heads
  return cfg, resolved


def method_record(name: str, heads: str | None = None, overrides: Mapping[str, Any] | None = None) -> dict:
  """``{"name", "heads", "overrides", "hyperparameters"}`` for results and manifests."""
  _, resolved = resolve_method(name, heads, overrides)
  return {"name": name, "heads": heads, "overrides": dict(overrides or {}), "hyperparameters": resolved}


@functools.lru_cache(maxsize=2)
def load_model(model_dir: str):
  """``air_jax.load_pretrained`` once per process and directory."""
  import air_jax

  return air_jax.load_pretrained(model_dir, dtype="float32")


def make_answerer(model_dir: str, method: str, *, max_new_tokens: int, backend: str | None = None,
                  heads: str | None = None, overrides: Mapping[str, Any] | None = None) -> Answerer:
  """``answerer(images, prompts) -> texts`` over ``air_jax.generate`` with the resolved method."""
  import air_jax

  cfg, _ = resolve_method(method, heads, overrides)
  model = load_model(model_dir)

  def answerer(images: list, prompts: list[str]) -> list[str]:
    out = air_jax.generate(model, cfg, images, list(prompts), max_new_tokens=max_new_tokens, backend=backend)
    return list(out.texts)

  return answerer


# ---------------------------------------------------------------------------------------------------------
# Answers files


def read_answers(path: str | Path) -> list[dict[str, Any]]:
  """The complete records of an answers JSONL file (none if it does not exist; a torn last line is dropped)."""
  path = Path(path)
  if not path.exists():
    return []
  records = []
  for n, obj in iter_jsonl(path):
    if "id" not in obj or "answer" not in obj:
      raise RunError(f"{path}:{n}: an answers record needs 'id' and 'answer' (keys: {sorted(obj)})")
    records.append(obj)
  return records


def _load_image(image: Any):
  if isinstance(image, (str, Path)):
    from PIL import Image

    with Image.open(image) as im:
      return im.convert("RGB")
  return image


def answer_samples(samples: Sequence[Mapping[str, Any]], answerer: Answerer, answers_path: str | Path, *,
                   meta: Mapping[str, Any], batch_size: int = 8, progress: bool = True,
                   load_image: Callable[[Any], Any] = _load_image) -> tuple[dict[Any, dict], list[dict]]:
  """Answers the samples not yet in ``answers_path``, appending one record per sample as it is produced.

  Args:
    samples: ``{"id", "image", "prompt", ...}``; ids must be unique. ``image`` is a path or an image object.
    answerer: ``answerer(images, prompts) -> texts``.
    answers_path: JSONL answers file (created or resumed).
    meta: Fields stored in every record; those in ``RESUME_KEYS`` must match the existing records.
    batch_size: Samples per answerer call.
    progress: Show a tqdm bar.
    load_image: Turns a sample's ``image`` into what the answerer takes (default: PIL from a path).

  Returns:
    (id -> record for every sample answered, now or before; skipped samples with the reason).
  """
  from tqdm import tqdm

  if batch_size < 1:
    raise RunError(f"--batch-size must be at least 1, got {batch_size}")
  ids = [s["id"] for s in samples]
  if len(set(map(json.dumps, ids))) != len(ids):
    raise RunError("sample ids are not unique")
  answers_path = Path(answers_path)
  answers_path.parent.mkdir(parents=True, exist_ok=True)
  repair_tail(answers_path)
  existing = read_answers(answers_path)
  for record in existing:
    for key in RESUME_KEYS:
      if key in record and key in meta and record[key] != meta[key]:
        raise RunError(f"{answers_path} was written with {key}={record[key]!r} but this run has "
                       f"{key}={meta[key]!r}; use another --out or remove the file")
  done = {json.dumps(r["id"]): r for r in existing}
  for s in samples:
    old = done.get(json.dumps(s["id"]))
    if old is not None and "prompt" in old and old["prompt"] != s["prompt"]:
      raise RunError(f"{answers_path} answered sample {s['id']!r} for the prompt {old['prompt']!r}, this run asks "
                     f"{s['prompt']!r}; use another --out or remove the file")
  todo = [s for s in samples if json.dumps(s["id"]) not in done]
  if done and todo:
    log.info("%s: resuming, %d of %d samples already answered", answers_path, len(samples) - len(todo), len(samples))
  skipped: list[dict] = []
  bar = tqdm(total=len(samples), initial=len(samples) - len(todo), unit="q", desc=str(meta.get("method", "")),
             disable=not progress, dynamic_ncols=True)
  try:
    for start in range(0, len(todo), batch_size):
      batch = todo[start:start + batch_size]
      images, ok = [], []
      for s in batch:
        try:
          images.append(load_image(s["image"]))
          ok.append(s)
        except Exception as e:  # noqa: BLE001 -- an unreadable image skips its sample, the run goes on
          log.warning("skipping sample %s: cannot read image %s (%s: %s)", s["id"], s["image"], type(e).__name__, e)
          skipped.append({"id": s["id"], "reason": f"unreadable image {s['image']}: {type(e).__name__}: {e}"})
      if ok:
        texts = answerer(images, [s["prompt"] for s in ok])
        if len(texts) != len(ok) or not all(isinstance(t, str) for t in texts):
          raise RunError(f"the answerer returned {len(texts)} items for {len(ok)} samples; expected one string each")
        for s, text in zip(ok, texts):
          record = {"id": s["id"], "prompt": s["prompt"], "answer": text, **meta}
          append_record(answers_path, record)
          done[json.dumps(s["id"])] = record
      bar.update(len(batch))
  finally:
    bar.close()
  wanted = {json.dumps(i) for i in ids}
  return {r["id"]: r for k, r in done.items() if k in wanted}, skipped


# ---------------------------------------------------------------------------------------------------------
# Statistics


def mean_std(values: Sequence[float]) -> dict[str, float | int | None]:
  """Mean and sample standard deviation (ddof = 1; None for fewer than two values) of finite values."""
  vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
  if not vals:
    return {"mean": None, "std": None, "n": 0}
  mean = sum(vals) / len(vals)
  std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else None
  return {"mean": mean, "std": std, "n": len(vals)}
