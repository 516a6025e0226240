"""CLI of the model organism.

  python -m organism data --out DIR [--n-train 2000] [--n-test 500] [--seed 0] [--size 64]
  python -m organism train --out organism/checkpoint [--seed 0] [--steps 700] [--batch-size 32] ...
  python -m organism train2 --out organism/checkpoint_v2 [--seed 0] ...   (v2: LM first, organism.train2)

`data` writes the COCO-style dataset root (splits train and test, synonyms.txt) that `python -m eval.chair` reads;
`train` retrains the shipped checkpoint (same seed and settings -> the same weights on the same machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Sequence


def _train_flags(p: argparse.ArgumentParser, v2: bool = False) -> None:
  from organism.train import TrainConfig
  from organism.train2 import Train2Config

  for f in dataclasses.fields(Train2Config if v2 else TrainConfig):
    kind = _bool if isinstance(f.default, bool) else type(f.default)
    p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default, help=f"default {f.default}")


def _bool(text: str) -> bool:
  """argparse type of a bool flag: true/false, yes/no, 1/0 (bool("false") would be True)."""
  value = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}.get(text.lower())
  if value is None:
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
  return value


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m organism", description="model organism of object hallucination")
  sub = p.add_subparsers(dest="command", required=True)
  d = sub.add_parser("data", help="write the COCO-style dataset root")
  d.add_argument("--out", required=True, help="dataset root directory")
  d.add_argument("--n-train", type=int, default=2000)
  d.add_argument("--n-test", type=int, default=500)
  d.add_argument("--seed", type=int, default=0)
  d.add_argument("--size", type=int, default=64, help="image side in pixels")
  t = sub.add_parser("train", help="train the captioner and save a Hugging Face checkpoint")
  t.add_argument("--out", required=True, help="checkpoint directory")
  _train_flags(t)
  t2 = sub.add_parser("train2", help="train organism v2 (LM first, as LLaVA: organism.train2)")
  t2.add_argument("--out", required=True, help="checkpoint directory")
  _train_flags(t2, v2=True)
  return p


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  if args.command == "data":
    from organism.dataset import write_dataset

    t0 = time.time()
    write_dataset(args.out, n_train=args.n_train, n_test=args.n_test, seed=args.seed, size=args.size)
    print(f"wrote {args.out} ({args.n_train} train, {args.n_test} test images) in {time.time() - t0:.1f}s")
    return 0
  if args.command == "train2":
    from organism.train2 import Train2Config, train2

    cfg2 = Train2Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Train2Config)})
    summary = train2(args.out, cfg2, log=lambda s: print(s, flush=True))
    print(f"{summary['num_parameters']:,} parameters, training {summary['train_seconds']:.0f}s, "
          f"{summary['checkpoint_bytes'] / 1e6:.1f} MB")
    return 0
  from organism.train import TrainConfig, train

  cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
  summary = train(args.out, cfg, log=lambda s: print(s, flush=True))
  print(f"{summary['num_parameters']:,} parameters, final loss {summary['final_loss']:.4f}, "
        f"training {summary['train_seconds']:.0f}s, total {summary['total_seconds']:.0f}s")
  return 0


if __name__ == "__main__":
  from eval.cli import run_cli

  sys.exit(run_cli(main))  # user and file-system errors: one `error:` line, status 2
