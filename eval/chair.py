"""CHAIR evaluation CLI: caption sampled COCO-style images with each method, then score with CHAIR.

  python -m eval.chair --coco-root DIR --model DIR --method greedy,air_star [--max-new-tokens 64]
  python -m eval.chair --coco-root DIR --captions results/greedy_captions.jsonl   # score only

Generation appends ``<out>/<method>_captions.jsonl`` record by record; a rerun skips the images already
captioned there (a torn last line from a crash is dropped), so an interrupted run resumes without losing or
duplicating an image. Scoring writes ``<out>/<label>_chair.json`` atomically in the reference structure
(``sentences``, ``overall_metrics`` with ``CHAIRs``/``CHAIRi`` and our recall/precision/F1/length) plus
``skipped`` (every caption or image left out, with the reason) and ``config``; a table compares the methods.
Sampling and ground truth: see ``eval.coco``; the metric: see ``eval.chair_metric``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from eval import chair_splits
from eval.captions_io import CaptionRecord, CaptionsFormatError, CaptionsWriter, load_captions, \
  read_jsonl_records
from eval.chair_metric import STYLES, Vocabulary, compute_chair
from eval.cli import check_output_dir, releases_output_locks, resolve_model_flag
from eval.coco import AnnotationError, CocoImages, GroundTruth, atomic_write_json, match_image_id

log = logging.getLogger("eval.chair")

# Decoding methods come from the air_jax.methods registry (`known_methods`); this list is for the help text.
# The registered methods at the time of writing (help text only; the registry, air_jax.methods.names(), decides).
METHODS = ("greedy", "air", "air_star", "adhh", "vcd", "dola", "pai", "farsight", "opera", "halc")
DEFAULT_PROMPT = "Please describe this image in detail."
# Settings a resumed captions file must share with the run that appends to it.
RESUME_KEYS = ("method", "prompt", "max_new_tokens", "protocol")

Captioner = Callable[[list, list[str]], list[str]]


class EvalError(RuntimeError):
  """A user-facing error: printed without a traceback, exit status 2."""


# ---------------------------------------------------------------------------------------------------------
# Backend and model


def check_backend(backend: str) -> list:
  """The JAX devices of ``backend`` ("cpu", "gpu" or "tpu"); an error naming the devices JAX has if none."""
  from air_jax.backend import BackendError, select_devices

  try:
    return select_devices(backend)
  except BackendError as e:
    raise EvalError(f"--backend {backend}: {e}") from e


@functools.lru_cache(maxsize=2)
def _load_model(model_dir: str, dtype: str = "float32"):
  import air_jax

  return air_jax.load_pretrained(model_dir, dtype=dtype)


def known_methods() -> tuple[str, ...]:
  """The registered decoding methods (air_jax.methods)."""
  from air_jax import methods

  return methods.names()


def read_air_config(path: str | None) -> dict[str, dict[str, Any]]:
  """Per-method config overrides from a JSON file {method: {field: value}} (keys starting with _ ignored)."""
  if path is None:
    return {}
  import json

  try:
    with open(path) as f:
      data = json.load(f)
  except OSError as e:
    raise EvalError(f"--air-config {path}: cannot read it ({e})") from e
  except json.JSONDecodeError as e:
    raise EvalError(f"--air-config {path}: not valid JSON ({e})") from e
  if not isinstance(data, dict):
    raise EvalError(f"--air-config {path}: expected an object {{method: {{field: value}}}}")
  out = {}
  for method, overrides in data.items():
    if method.startswith("_"):
      continue
    known = [m for m in known_methods() if m != "greedy"]
    if method not in known:
      raise EvalError(f"--air-config {path}: unknown method {method!r}; expected one of {', '.join(known)}")
    if not isinstance(overrides, dict):
      raise EvalError(f"--air-config {path}: the entry of {method!r} must be an object of AIRConfig fields")
    out[method] = overrides
  return out


def make_captioner(model_dir: str, method: str, *, prompt: str, max_new_tokens: int, backend: str | None,
                   heads: str | None = None, overrides: dict[str, Any] | None = None,
                   batch_size: int | None = None, protocol=None, synonyms: str | None = None) -> Captioner:
  """The generation backend: ``captioner(images, file_names) -> texts`` over air_jax's public API.

  Args:
    model_dir: Converted model directory (``air_jax.load_pretrained``); loaded once per process.
    method: a registered decoding method (``air_jax.methods.names()``: greedy, air, vcd, dola, ...).
    prompt: The instruction asked for every image.
    max_new_tokens: Generation budget.
    backend: "cpu", "gpu", "tpu" or None (JAX's default).
    heads: Optional heads JSON for the methods that take sensitive heads (the AIR family).
    overrides: config field overrides for the method's preset (see --air-config).
    batch_size: the run's batch size: a smaller (last) batch is padded to it with copies of its first image and
      the padding captions dropped, so every batch reuses one compiled graph (not under a protocol that groups
      prompts by length, whose batches must stay as the official run has them, nor for a method that computes a
      statistic over the batch: DoLa batch_js, the official AD-HH trigger).
    protocol: an ``air_jax.protocol.Protocol`` or its name (None: the default protocol): prompt template,
      padding, model dtype and the config fields it fixes (for the methods that have them: the AIR family).
    synonyms: the run's CHAIR vocabulary file, for the methods that ground object words (HALC).

  The captioner's ``hyperparameters`` attribute holds the method's resolved settings (written into results).
  """
  import air_jax  # lazily: the CLI also scores captions files without the library's model code

  dtype, fixed, extra, group = "float32", {}, {}, False
  if protocol is not None:
    from air_jax.protocol import get_protocol

    protocol = get_protocol(protocol)
    dtype, fixed, extra, group = protocol.dtype, protocol.air_overrides(), {"protocol": protocol}, \
        protocol.group_by_length
  model = _load_model(model_dir, dtype)
  if protocol is not None:
    protocol.check_family(model.config)  # before any caption
  sources = " or ".join(x for x in (f"--heads {heads}" if heads else "", "--air-config" if overrides else "") if x)
  try:
    base = air_jax.methods.make(method, run_options={"heads": heads, "synonyms": synonyms}, **(overrides or {}))
    # The protocol fixes fields of the methods that have them (the AIR family: layer reading, official_compat).
    fields = {f.name for f in dataclasses.fields(base)} if dataclasses.is_dataclass(base) else set()
    fixed = {k: v for k, v in fixed.items() if k in fields and k not in (overrides or {})}
    method_cfg = base.replace(**fixed) if fixed else base
    # Compiled against the model now (heads in range, layer ranges inside it): errors surface before any caption.
    compiled = air_jax.methods.as_compiled(method_cfg, model.config)
  except ValueError as e:
    where = f" (from {sources})" if sources else ""
    hint = "; give the heads file with --heads FILE" if "heads" in str(e) and not heads else ""
    raise ValueError(f"method {method!r}{where}: {e}{hint}") from None
  # A method whose rows see each other (a statistic over the batch) gets no padding captions: they would enter it.
  pad_batches = batch_size is not None and not group and not compiled.plan.couples_rows(compiled.values)

  def captioner(images: list, file_names: list[str]) -> list[str]:
    del file_names  # the model only sees pixels
    n = len(images)
    padded = list(images) + [images[0]] * max(0, batch_size - n) if pad_batches else list(images)
    out = air_jax.generate(model, method_cfg, padded, [prompt] * len(padded), max_new_tokens=max_new_tokens,
                           backend=backend, **extra)
    return list(out.texts)[:n]

  captioner.hyperparameters = air_jax.methods.hyperparameters(method_cfg)
  return captioner


# ---------------------------------------------------------------------------------------------------------
# Generation


def _load_image(path: Path):
  from PIL import Image

  with Image.open(path) as image:
    return image.convert("RGB")


def generate_captions(image_ids: Sequence[Any], images: CocoImages, captioner: Captioner, captions_path: Path,
                      *, meta: dict[str, Any], batch_size: int = 8, progress: bool = True) -> list[dict]:
  """Caption the images not yet in ``captions_path``, appending one record per image as it is produced.

  Args:
    image_ids: Images to caption, in order.
    images: Where the image files are.
    captioner: ``captioner(pil_images, file_names) -> texts``.
    captions_path: Our JSONL captions file (created or resumed).
    meta: Fields stored in every record; ``RESUME_KEYS`` among them must match the existing records.
    batch_size: Images per captioner call.
    progress: Show a tqdm bar (images per second).

  Returns:
    Skipped images: ``{"image_id", "file_name", "reason"}`` for each image that could not be read.
  """
  from tqdm import tqdm

  if batch_size < 1:
    raise EvalError(f"--batch-size must be at least 1, got {batch_size}")
  writer = CaptionsWriter(captions_path)
  existing = read_jsonl_records(captions_path)
  for record in existing:
    for key in RESUME_KEYS:
      if key in record.extra and key in meta and record.extra[key] != meta[key]:
        raise EvalError(f"{captions_path} was generated with {key}={record.extra[key]!r} but this run asks "
                        f"{key}={meta[key]!r}; use another --out or remove the file")
  done = {r.image_id for r in existing}
  todo = [i for i in image_ids if i not in done]
  if done and todo:
    log.info("%s: resuming, %d of %d images already captioned", captions_path, len(image_ids) - len(todo),
             len(image_ids))
  skipped: list[dict] = []
  bar = tqdm(total=len(image_ids), initial=len(image_ids) - len(todo), unit="img", desc=meta.get("method"),
             disable=not progress, dynamic_ncols=True)
  try:
    for start in range(0, len(todo), batch_size):
      batch = todo[start:start + batch_size]
      pixels, ids = [], []
      for image_id in batch:
        path = images.image_path(image_id)
        try:
          pixels.append(_load_image(path))
          ids.append(image_id)
        except Exception as e:  # noqa: BLE001 -- any decoder failure means "unreadable", the run goes on
          log.warning("skipping image %s: cannot read %s (%s: %s)", image_id, path, type(e).__name__, e)
          skipped.append({"image_id": image_id, "file_name": images.file_names[image_id],
                          "reason": f"unreadable image {path}: {type(e).__name__}: {e}"})
      if ids:
        names = [images.file_names[i] for i in ids]
        texts = captioner(pixels, names)
        if len(texts) != len(ids) or not all(isinstance(t, str) for t in texts):
          raise EvalError(f"the captioner returned {len(texts)} items for {len(ids)} images; expected one "
                          "string per image")
        for image_id, name, text in zip(ids, names, texts):
          writer.write({"image_id": image_id, "file_name": name, "caption": text, **meta})
      bar.update(len(batch))
  finally:
    bar.close()
  return skipped


# ---------------------------------------------------------------------------------------------------------
# Scoring


def score_records(records: Sequence[CaptionRecord], images: CocoImages, gt: GroundTruth, vocab: Vocabulary, *,
                  source: str, sample: Iterable[Any] | None = None) -> dict[str, Any]:
  """Score captions; every record left out is listed under ``skipped`` with its reason.

  Args:
    records: Captions to score.
    images: The split's images (ids and file names).
    gt: Ground truth.
    vocab: Vocabulary.
    source: Captions file name, for messages.
    sample: If given, only these image ids are scored (the run's sample); others are skipped.

  Raises:
    EvalError: No caption can be scored (e.g. the file is from another image set).
  """
  by_name = {name: i for i, name in images.file_names.items()}
  sample_set = set(sample) if sample is not None else None
  skipped, valid, seen = [], [], set()
  unknown = 0
  for record in records:
    image_id = match_image_id(record.image_id, images.file_names)
    if image_id is None and record.extra.get("file_name") in by_name:
      image_id = by_name[record.extra["file_name"]]
    reason = None
    if image_id is None:
      unknown += 1
      reason = f"unknown image id: not among the {len(images.ids)} images of {images.split}"
    elif sample_set is not None and image_id not in sample_set:
      reason = "image not in this run's sample (--num-images/--seed differ from the run that wrote it)"
    elif image_id in seen:
      reason = "duplicate caption for this image (the first one is scored)"
    if reason:
      skipped.append({"image_id": record.image_id, "reason": reason})
      continue
    seen.add(image_id)
    valid.append({**record.extra, "image_id": image_id, "caption": record.caption})
  if unknown:
    examples = [s["image_id"] for s in skipped if s["reason"].startswith("unknown")][:5]
    log.warning("%s: %d of %d captions have image ids unknown to %s (e.g. %s)", source, unknown, len(records),
                images.split, examples)
  if not valid:
    hint = " Is it from another image set?" if unknown == len(records) and records else ""
    raise EvalError(f"{source}: none of its {len(records)} captions can be scored "
                    f"({len(skipped)} skipped: {_reason_counts(skipped)}).{hint}")
  for reason, count in _reason_counts(skipped).items():
    log.warning("%s: skipped %d caption(s): %s", source, count, reason)
  # An empty caption is scored as a caption that names no object (C_S 0 for it), as the reference script counts
  # every caption it is given; its ids are listed so a run with many empty outputs is visible.
  empty = [r["image_id"] for r in valid if not r["caption"].strip()]
  if empty:
    log.warning("%s: %d of %d scored captions are empty (scored as naming no object)", source, len(empty),
                len(valid))
  gt_objects = gt.objects(r["image_id"] for r in valid)
  result = compute_chair(valid, gt_objects, vocab)
  result["skipped"] = skipped
  result["empty_captions"] = empty
  return result


def _reason_counts(skipped: Sequence[dict]) -> dict[str, int]:
  counts: dict[str, int] = {}
  for s in skipped:
    key = s["reason"].split(":")[0] if s["reason"].startswith("unreadable") else s["reason"]
    counts[key] = counts.get(key, 0) + 1
  return counts


def format_table(results: dict[str, dict[str, Any]]) -> str:
  """Side-by-side table of overall metrics (percentages except lengths)."""
  header = f"{'method':<14}{'n':>6}{'C_S':>8}{'C_I':>8}{'recall':>8}{'prec':>8}{'F1':>8}{'len':>8}{'skip':>6}"
  lines = [header, "-" * len(header)]
  for label, result in results.items():
    m = result["overall_metrics"]
    lines.append(f"{label:<14}{m['num_captions']:>6}{100 * m['CHAIRs']:>8.1f}{100 * m['CHAIRi']:>8.1f}"
                 f"{100 * m['Recall']:>8.1f}{100 * m['Precision']:>8.1f}{100 * m['F1']:>8.1f}"
                 f"{m['avg_len_words']:>8.1f}{len(result['skipped']):>6}")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m eval.chair", description=__doc__.splitlines()[0])
  p.add_argument("--coco-root", help="COCO-style root (annotations/, <split>/). Without it and without --model: "
                                      "the embedded model organism on its held-out split (see eval.organism_default)")
  p.add_argument("--split", default=None, help="default val2014 (test for the organism)")
  p.add_argument("--num-images", type=int, default=None, help="default 500 (all held-out scenes for the organism)")
  p.add_argument("--seed", type=int, default=42)
  p.add_argument("--splits", type=int, default=1, help="score K samples of --num-images images and report mean and "
                                                       "std (see eval.chair_splits)")
  p.add_argument("--split-mode", choices=("disjoint", "seeded"), default="disjoint",
                 help="disjoint samples (default; the first is the usual one) or seeds seed..seed+K-1")
  p.add_argument("--prompt", default=DEFAULT_PROMPT)
  p.add_argument("--method", action="append", default=None,
                 help=f"{'|'.join(METHODS)}; repeat or comma-separate to compare (default greedy). With "
                      "--captions: the label of each file")
  p.add_argument("--max-new-tokens", type=int, default=64)
  p.add_argument("--batch-size", type=int, default=None, help="default: the protocol's (8; 4 for official-air)")
  p.add_argument("--protocol", default="default",
                 help="default | official-air: official-air reproduces the published AIR* run (LLaVA's vicuna_v1 "
                      "template, no prompt padding, batches of 4 in sample order, absolute layer ranges, "
                      "float16; see air_jax.protocol). Recorded in every output")
  p.add_argument("--backend", choices=("cpu", "gpu", "tpu"), default=None)
  p.add_argument("--model", help="checkpoint directory or Hugging Face repository id, org/name[@revision] "
                                  "(needed to generate)")
  p.add_argument("--heads", help="heads JSON for the AIR/AD-HH presets")
  p.add_argument("--air-config", help="JSON {method: {config field: value}} overriding the presets' "
                                      "hyperparameters (recorded in the output)")
  p.add_argument("--out", default="results", help="output directory (default results/)")
  p.add_argument("--captions", action="append", default=None,
                 help="score this captions file instead of generating (ours, OPERA/LLaVA JSONL or the "
                      "reference imgToEval JSON); may repeat")
  p.add_argument("--synonyms", help="vocabulary file (default: the COCO CHAIR synonyms)")
  p.add_argument("--vocab-rules", choices=("auto", "coco", "generic"), default="auto",
                 help="hard-coded double-word rules: COCO's, or derived from the file (auto: by categories)")
  p.add_argument("--style", choices=STYLES, default="adhh",
                 help="adhh = the CHAIR code AIR reports with (default); rohrbach = singularise tokens first")
  p.add_argument("--reference-split", action="store_true",
                 help="parse synonyms with the reference's split(', ') unstripped, so ' motor bike' and "
                      "' cheesecake' never match (bit-exact with the published CHAIR code)")
  p.add_argument("--cache-dir", help="ground-truth cache directory (default <out>/cache)")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  p.add_argument("--compile-cache", metavar="DIR",
                 help="JAX persistent compilation cache: repeated runs load compiled graphs from DIR")
  return p


def apply_defaults(args: argparse.Namespace) -> None:
  """Fills split/num-images; with neither --coco-root nor --model (nor --captions), the organism defaults."""
  if args.coco_root is None:
    if args.model is not None or args.captions:
      raise EvalError("--coco-root DIR is required with --model or --captions")
    from eval import organism_default

    organism_default.apply(args)
  args.split = args.split or "val2014"
  args.num_images = 500 if args.num_images is None else args.num_images


def _methods(values: list[str] | None) -> list[str]:
  methods = [m.strip() for v in values or () for m in v.split(",") if m.strip()]
  if len(set(methods)) != len(methods):
    raise EvalError(f"--method lists a method twice: {methods}")
  return methods


def _protocol(args: argparse.Namespace) -> dict[str, Any]:
  """Resolves --protocol (and the batch size it implies); returns the protocol as a dict (what is recorded)."""
  from air_jax.protocol import PROTOCOLS

  if args.protocol not in PROTOCOLS:
    raise EvalError(f"unknown --protocol {args.protocol!r}; expected one of {', '.join(sorted(PROTOCOLS))}")
  protocol = PROTOCOLS[args.protocol]
  if args.batch_size is None:
    args.batch_size = protocol.batch_size
  elif protocol.name == "official-air" and args.batch_size != protocol.batch_size:
    raise EvalError(f"--protocol official-air runs batches of {protocol.batch_size} (its AD-HH trigger sums over "
                    f"the batch); drop --batch-size {args.batch_size}")
  return protocol.to_dict()


def _label_for(path: Path) -> str:
  stem = path.stem
  return stem[:-len("_captions")] if stem.endswith("_captions") else stem


@releases_output_locks
def run(argv: Sequence[str] | None = None,
        captioner_factory: Callable[[str], Captioner] | None = None) -> dict[str, dict[str, Any]]:
  """Run the evaluation; returns label -> output JSON (as written). Tests inject ``captioner_factory``."""
  args = build_parser().parse_args(argv)
  apply_defaults(args)
  if args.backend is not None:
    check_backend(args.backend)  # before any work: a wrong platform should fail at once
  if args.compile_cache:
    from air_jax.compile_cache import enable_compile_cache

    try:
      enable_compile_cache(args.compile_cache)
    except ValueError as e:
      raise EvalError(str(e)) from e
  methods = _methods(args.method)
  out_dir = Path(args.out)
  check_output_dir(out_dir)  # before any work: a bad --out must not cost a captioning run
  protocol = None if args.captions else _protocol(args)  # score-only runs import no library code
  if args.captions:
    if args.model is not None:
      log.warning("--captions given: the captions are scored as they are; --model %s (and generation flags such "
                  "as --max-new-tokens) are not used", args.model)
    if methods and len(methods) != len(args.captions):
      raise EvalError(f"{len(args.captions)} --captions file(s) but {len(methods)} --method label(s)")
    jobs = [(methods[n] if methods else _label_for(Path(f)), Path(f)) for n, f in enumerate(args.captions)]
    labels = [label for label, _ in jobs]
    if len(set(labels)) != len(labels):
      raise EvalError(f"two captions files share a label {labels}; name them with --method")
  else:
    methods = methods or ["greedy"]
    unknown = [m for m in methods if m not in known_methods()]
    if unknown:
      raise EvalError(f"unknown --method {unknown}; expected {', '.join(known_methods())}")
    if captioner_factory is None:
      if not args.model:
        raise EvalError("--model DIR is required to generate captions (or pass --captions FILE to score)")
      args.model = resolve_model_flag(args.model)
    if args.heads and not Path(args.heads).is_file():
      raise EvalError(f"--heads {args.heads}: file not found")
    if args.max_new_tokens < 1:
      raise EvalError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    jobs = [(m, out_dir / f"{m}_captions.jsonl") for m in methods]

  air_overrides = read_air_config(args.air_config)
  try:  # setup errors are about the user's files and flags: report them without a traceback
    vocab = Vocabulary.from_file(args.synonyms, rules=args.vocab_rules, style=args.style,
                                 strip_entries=not args.reference_split)
    images = CocoImages(args.coco_root, args.split)
    gt = GroundTruth(args.coco_root, args.split, vocab, cache_dir=args.cache_dir or out_dir / "cache")
    sample = None if args.captions else images.sample(args.num_images, args.seed)
    if sample is not None:
      gt.objects(sample)  # reads and checks the annotations now (cached for scoring), not after captioning
    split_ids = None
    if sample is not None and args.splits != 1:
      split_ids = chair_splits.make_splits(images.ids, args.num_images, args.splits, args.seed, args.split_mode)
      sample = chair_splits.union(split_ids)
    if sample is not None and captioner_factory is None:
      def captioner_factory(method: str) -> Captioner:
        return make_captioner(args.model, method, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
                              backend=args.backend, heads=args.heads, overrides=air_overrides.get(method),
                              batch_size=args.batch_size,
                              protocol=None if protocol["name"] == "default" else protocol["name"],
                              synonyms=args.synonyms)
    # every method's captioner before any generation, so a bad preset fails before hours of work
    captioners = {label: captioner_factory(label) for label, _ in jobs} if sample is not None else {}
  except ValueError as e:
    raise EvalError(str(e)) from e

  results = {}
  for label, captions_path in jobs:
    gen_skipped: list[dict] = []
    started = time.time()
    if sample is not None:
      meta = {"method": label, "prompt": args.prompt, "max_new_tokens": args.max_new_tokens,
              "protocol": protocol["name"]}
      gen_skipped = generate_captions(sample, images, captioners[label], captions_path, meta=meta,
                                      batch_size=args.batch_size, progress=not args.no_progress)
      records = read_jsonl_records(captions_path)
    else:
      records = load_captions(captions_path)
    result = score_records(records, images, gt, vocab, source=str(captions_path), sample=sample)
    result["skipped"] = gen_skipped + result["skipped"]
    if split_ids is not None:
      def score_split(ids, records=records, captions_path=captions_path):
        wanted = set(ids)
        return score_records([r for r in records if r.image_id in wanted], images, gt, vocab,
                             source=str(captions_path), sample=ids)
      result["splits"] = chair_splits.score_splits(score_split, split_ids, args.split_mode)
    result["config"] = {
      "label": label, "captions_file": str(captions_path), "out": str(out_dir), "coco_root": str(args.coco_root),
      "split": args.split, "num_images": None if sample is None else args.num_images,
      "seed": None if sample is None else args.seed, "prompt": args.prompt if sample is not None else None,
      "max_new_tokens": args.max_new_tokens if sample is not None else None, "model": args.model,
      "heads": args.heads, "air_config": air_overrides.get(label), "backend": args.backend,
      "method_hyperparameters": getattr(captioners.get(label), "hyperparameters", None),
      "synonyms": str(args.synonyms or "default (COCO)"),
      "vocab_rules": args.vocab_rules, "reference_split": args.reference_split, "style": vocab.style,
      "vocab_sha256": vocab.digest(),
      "ground_truth_key": gt.key, "seconds": round(time.time() - started, 3),
      "protocol": protocol, "batch_size": args.batch_size if sample is not None else None,
    }
    atomic_write_json(out_dir / f"{label}_chair.json", result, indent=1)
    if sample is not None:
      chair_splits.write_manifest(out_dir, label, args, sample, images.file_names, split_ids, air_overrides.get(label))
    results[label] = result
  return results


def main(argv: Sequence[str] | None = None, captioner_factory: Callable[[str], Captioner] | None = None) -> int:
  """CLI entry point: prints the table, returns the exit status (2 on a user error)."""
  from eval.cli import run_cli, where_results_are

  def body() -> int:
    results = run(argv, captioner_factory)
    print(format_table(results))
    if any("splits" in r for r in results.values()):
      print(chair_splits.format_summary(results))
    print(where_results_are(*sorted({r["config"]["out"] for r in results.values()})))
    return 0

  return run_cli(body, (EvalError, AnnotationError, CaptionsFormatError))


if __name__ == "__main__":
  sys.exit(main())
