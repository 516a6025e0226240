"""Describe images with several decoding methods side by side: the quickest look at what a method changes.

  python -m eval.describe IMAGE [IMAGE ...] --model DIR_OR_ORG/NAME --method greedy,air,vcd --heads heads.json
  python -m eval.describe          # the organism: two of its held-out scenes, greedy and AIR with its shipped heads

Every method of the registry (`air_jax.methods`) is resolved as `eval.chair` resolves it (`--heads`, per-method
overrides from `--air-config`). Per image it prints each method's text; `--stats` adds the mean attention mass the
generated tokens put on the image, the text and the system keys (over every layer and head: the imbalance AIR
rectifies); `--json FILE` writes every record (method, resolved hyperparameters, image, prompt, text, token ids,
attention masses) atomically.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from eval.cli import UserError, resolve_model_flag

log = logging.getLogger("eval.describe")

DEFAULT_PROMPT = "Please describe this image in detail."
ORGANISM_IMAGES = 2


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m eval.describe", description=__doc__.splitlines()[0])
  p.add_argument("images", nargs="*", help="image files (default with no --model: two organism scenes)")
  p.add_argument("--model", help="checkpoint directory or Hugging Face repository id (default: the organism)")
  p.add_argument("--method", default=None,
                 help="comma-separated registered methods (default greedy, and air when heads are known)")
  p.add_argument("--heads", help="heads file for the AIR family (eval.attribute's heads_*.json)")
  p.add_argument("--air-config", help="JSON {method: {field: value}}: per-method overrides, as eval.chair")
  p.add_argument("--prompt", default=DEFAULT_PROMPT)
  p.add_argument("--max-new-tokens", type=int, default=64)
  p.add_argument("--num-beams", type=int, default=1)
  p.add_argument("--do-sample", action="store_true", help="sample instead of greedy (--temperature, --top-p)")
  p.add_argument("--temperature", type=float, default=1.0)
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
  p.add_argument("--stats", action="store_true", help="also print each method's attention mass on image / text")
  p.add_argument("--json", help="write every record to this JSON file")
  return p


def _organism_defaults(args: argparse.Namespace, tmp: Path) -> None:
  from eval import organism_default as od

  if not od.CHECKPOINT.is_dir():
    raise UserError(f"the organism checkpoint is missing at {od.CHECKPOINT}")
  root = od.ensure_dataset(tmp / "organism_data", n_test=ORGANISM_IMAGES)
  args.model = str(od.CHECKPOINT)
  args.images = [str(p) for p in sorted((root / "test").iterdir())[:ORGANISM_IMAGES]]
  args.labels = [f"organism test scene {Path(p).name}" for p in args.images]  # the files are temporary
  args.heads = args.heads or (str(od.HEADS) if od.HEADS.is_file() else None)
  args.air_config = args.air_config or (str(od.AIR_CONFIG) if od.AIR_CONFIG.is_file() else None)


def attention_masses(out, row: int) -> dict[str, float] | None:
  """Mean attention mass of row `row`'s generated tokens on system / image / text keys (all layers and heads)."""
  if out.segment_mass is None:
    return None
  n = int(out.num_tokens[row])
  mass = np.asarray(out.segment_mass[row, :n], np.float64)  # [n, L, H, 3]
  mean = mass.reshape(-1, 3).mean(0) if n else np.full(3, np.nan)
  return {"system": float(mean[0]), "image": float(mean[1]), "text": float(mean[2])}


def describe(args: argparse.Namespace) -> list[dict[str, Any]]:
  """Generates every method's text for every image; returns the records (also printed)."""
  import air_jax
  from eval.chair import EvalError, read_air_config
  from eval.runner import RunError, resolve_method

  methods = [m.strip() for m in (args.method or "").split(",") if m.strip()]
  if not methods:
    methods = ["greedy", "air"] if args.heads else ["greedy"]
  if len(set(methods)) != len(methods):
    raise UserError(f"--method lists a method twice: {methods}")
  if args.max_new_tokens < 1 or args.num_beams < 1:
    raise UserError(f"--max-new-tokens and --num-beams must be >= 1, got {args.max_new_tokens}, {args.num_beams}")
  try:
    overrides = read_air_config(args.air_config)
    resolved = {m: resolve_method(m, args.heads, overrides.get(m)) for m in methods}
  except (EvalError, RunError) as e:
    raise UserError(str(e)) from e
  images = [air_jax.load_image(p, p) for p in args.images]  # an ImageError names the file
  path = resolve_model_flag(args.model)
  from air_jax.generate import check_decoding_options
  from air_jax.loading import load_config

  config, _ = load_config(path)
  compiled = {}
  for name in methods:  # every method against the model and the options before any weight is read
    try:
      compiled[name] = air_jax.methods.as_compiled(resolved[name][0], config)
      check_decoding_options(compiled[name], num_beams=args.num_beams, sampling=args.do_sample)
    except ValueError as e:
      raise UserError(f"method {name}: {e}") from e
  model = air_jax.load_pretrained(path, dtype=args.dtype)
  stats = bool(args.stats or args.json)
  labels = getattr(args, "labels", None) or list(args.images)
  records = []
  for name in methods:
    cfg, hyper = resolved[name]
    # Methods with their own search (OPERA, HALC) and beam search keep no per-step attention statistics.
    own_search = compiled[name].plan.searches
    out = air_jax.generate(model, cfg, images, args.prompt, max_new_tokens=args.max_new_tokens,
                           num_beams=args.num_beams, do_sample=args.do_sample, temperature=args.temperature,
                           top_p=args.top_p, seed=args.seed,
                           output_attention_stats=stats and args.num_beams == 1 and not own_search)
    for i, label in enumerate(labels):
      n = int(out.num_tokens[i])
      records.append({"method": name, "hyperparameters": hyper, "image_index": i, "image": label,
                      "prompt": args.prompt, "text": out.texts[i], "token_ids": out.token_ids[i, :n].tolist(),
                      "attention_mass": attention_masses(out, i)})
  width = max(len(m) for m in methods)
  for i, label in enumerate(labels):
    print(f"== {label}")
    for r in (r for r in records if r["image_index"] == i):
      print(f"  {r['method']:<{width}}  {r['text']}")
      if args.stats and r["attention_mass"] is not None:
        m = r["attention_mass"]
        print(f"  {'':<{width}}  attention mass: image {m['image']:.3f}, text {m['text']:.3f}, "
              f"system {m['system']:.3f}")
  return records


def main(argv: Sequence[str] | None = None) -> int:
  from eval.cli import run_cli

  def body() -> int:
    args = build_parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="air_describe_") as tmp:
      if args.model is None:
        if args.images:
          raise UserError("--model is required with images (with neither, the organism describes its own scenes)")
        _organism_defaults(args, Path(tmp))
      elif not args.images:
        raise UserError("give at least one image file")
      records = describe(args)
    if args.json:
      from eval.coco import atomic_write_json

      atomic_write_json(args.json, records, indent=1)
      print(f"results: {args.json}")
    return 0

  from air_jax.images import ImageError

  return run_cli(body, (ImageError,))


if __name__ == "__main__":
  raise SystemExit(main())
