"""Chooses the organism's AIR settings on a dev split (never on the held-out test scenes), in vmapped sweeps.

  python -m organism.tune_air --dev-root DIR --attribution DIR --out organism/checkpoint/air_config.json

`--dev-root` is a COCO-style organism root written with another seed than the evaluation's (e.g.
`python -m organism data --out DIR --n-train 0 --n-test 400 --seed 1`), `--attribution` the output directory of
`python -m eval.attribute` on that split (its `attribution.npz` ranks the heads by S_h). Each head count k and
hyperparameter tuple is one AIRConfig; configs are run together with `air_jax.generate_sweep`. The winner is the
config with the lowest C_S among the admissible ones: object recall >= `--min-recall`, precision >=
`--min-precision` (default: greedy's), F1 >= `--min-f1` (default: greedy's minus 0.02), and at most
`--max-malformed` malformed captions (no object named, an object or sentence repeated, no final period:
`organism.quality.is_malformed`). Every row is printed with C_S, C_I, recall, precision, F1, the malformed fraction
and the constraints it fails, so the choice can be checked; the winner is written as the per-method override file
that `python -m eval.chair --air-config` reads, with its dev-split metrics and the constraints. `--grid paper`
evaluates the paper's settings only (lambda 3.5, gamma 0.1, tau 0.3, beta 0.3) for each k.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
from typing import Any, Mapping, Sequence

import numpy as np

GRID_K = (4, 8, 12)
# (visual_factor lambda, text_factor gamma, tau_text, beta)
GRID_VALUES = ((8.0, 0.05, 0.1, 0.5), (5.0, 0.1, 0.1, 0.3), (8.0, 0.05, 0.1, 0.8), (12.0, 0.02, 0.05, 0.5))
PAPER_VALUES = ((3.5, 0.1, 0.3, 0.3),)


@dataclasses.dataclass(frozen=True)
class Constraints:
  """What a tuned config must keep on the dev split (fractions in [0, 1])."""

  min_recall: float = 0.75
  min_precision: float = 0.0
  min_f1: float = 0.0
  max_malformed: float = 0.02

  def failures(self, m: Mapping[str, float]) -> list[str]:
    """Names of the constraints metrics m (CHAIR overall metrics + "malformed") violates."""
    out = []
    if m["Recall"] < self.min_recall:
      out.append(f"recall<{self.min_recall:g}")
    if m["Precision"] < self.min_precision:
      out.append(f"precision<{self.min_precision:g}")
    if m["F1"] < self.min_f1:
      out.append(f"F1<{self.min_f1:g}")
    if m["malformed"] > self.max_malformed:
      out.append(f"malformed>{self.max_malformed:g}")
    return out


def select(rows: Sequence[tuple[str, Any, Mapping[str, float]]], constraints: Constraints):
  """The admissible row (name, key, metrics) with the lowest C_S (ties: higher F1, then order), or None."""
  ok = [r for r in rows if not constraints.failures(r[2])]
  if not ok:
    return None
  return min(enumerate(ok), key=lambda t: (t[1][2]["CHAIRs"], -t[1][2]["F1"], t[0]))[1]


def format_table(rows: Sequence[tuple[str, Any, Mapping[str, float]]], constraints: Constraints) -> str:
  """The sweep as a fixed-width table: C_S, C_I, recall, precision, F1, malformed (%) and failed constraints."""
  lines = [f"{'config':<52}{'C_S':>7}{'C_I':>7}{'recall':>8}{'prec':>7}{'F1':>7}{'malf':>7}  fails"]
  for name, key, m in rows:
    fails = ",".join(constraints.failures(m)) if key is not None else "(baseline)"
    lines.append(f"{name:<52}{100 * m['CHAIRs']:>7.1f}{100 * m['CHAIRi']:>7.1f}{100 * m['Recall']:>8.1f}"
                 f"{100 * m['Precision']:>7.1f}{100 * m['F1']:>7.1f}{100 * m['malformed']:>7.1f}  {fails}")
  return "\n".join(lines)


def top_heads(scores: np.ndarray, k: int) -> list[tuple[int, int]]:
  """The k (layer, head) pairs with the largest score (NaN last)."""
  order = np.argsort(-np.nan_to_num(scores.ravel(), nan=-np.inf), kind="stable")
  h = scores.shape[1]
  return [(int(i // h), int(i % h)) for i in order[:k]]


def main(argv: Sequence[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m organism.tune_air", description=__doc__.splitlines()[0])
  ap.add_argument("--dev-root", required=True)
  ap.add_argument("--attribution", required=True, help="eval.attribute output directory (attribution.npz)")
  ap.add_argument("--model", default=os.path.join(os.path.dirname(__file__), "checkpoint"))
  ap.add_argument("--num-images", type=int, default=400)
  ap.add_argument("--min-recall", type=float, default=0.75)
  ap.add_argument("--min-precision", type=float, default=None,
                  help="default: greedy's precision on the dev split (AIR must not name more wrong objects per object)")
  ap.add_argument("--min-f1", type=float, default=None, help="default: greedy's F1 on the dev split minus 0.02")
  ap.add_argument("--max-malformed", type=float, default=0.02, help="fraction of malformed captions allowed")
  ap.add_argument("--grid", choices=("wide", "paper"), default="wide")
  ap.add_argument("--max-new-tokens", type=int, default=64)
  ap.add_argument("--batch-size", type=int, default=100)
  ap.add_argument("--out", help="write the chosen overrides here ({'air': {...}})")
  args = ap.parse_args(argv)

  from PIL import Image

  import air_jax
  from air_jax.atomic import atomic_write_json
  from eval.chair_metric import Vocabulary, compute_chair
  from eval.coco import CocoImages, GroundTruth
  from organism.quality import malformed_fraction

  vocab = Vocabulary.from_file(os.path.join(args.dev_root, "synonyms.txt"))
  images = CocoImages(args.dev_root, "test")
  ids = images.ids[: args.num_images]
  gt = GroundTruth(args.dev_root, "test", vocab, cache_dir=os.path.join(args.dev_root, "cache")).objects(ids)
  pil = [Image.open(images.image_path(i)).convert("RGB") for i in ids]
  model = air_jax.load_pretrained(args.model)
  scores = np.load(os.path.join(args.attribution, "attribution.npz"))["prob_S"]
  prompt = "Please describe this image in detail."

  def metrics(texts):
    records = [{"image_id": i, "caption": t} for i, t in zip(ids, texts)]
    m = dict(compute_chair(records, gt, vocab)["overall_metrics"])
    m["malformed"] = malformed_fraction(texts)
    return m

  greedy = []
  for s in range(0, len(pil), args.batch_size):
    greedy += air_jax.generate(model, None, pil[s:s + args.batch_size], prompt, max_new_tokens=args.max_new_tokens).texts
  rows = [("greedy", None, metrics(greedy))]
  g = rows[0][2]
  constraints = Constraints(args.min_recall,
                            g["Precision"] if args.min_precision is None else args.min_precision,
                            g["F1"] - 0.02 if args.min_f1 is None else args.min_f1, args.max_malformed)
  grid = list(itertools.product(GRID_K, PAPER_VALUES if args.grid == "paper" else GRID_VALUES))
  cfgs = [air_jax.AIRConfig.preset("air", heads=top_heads(scores, k), visual_factor=lam, text_factor=gam,
                                   tau_text=tau, beta=beta) for k, (lam, gam, tau, beta) in grid]
  texts = [[] for _ in cfgs]
  for s in range(0, len(pil), args.batch_size):
    outs = air_jax.generate_sweep(model, cfgs, pil[s:s + args.batch_size], prompt, max_new_tokens=args.max_new_tokens)
    for acc, out in zip(texts, outs):
      acc.extend(out.texts)
  for (k, values), t in zip(grid, texts):
    rows.append((f"air k={k} lambda={values[0]} gamma={values[1]} tau={values[2]} beta={values[3]}", (k, values),
                 metrics(t)))
  print(format_table(rows, constraints))
  best = select(rows[1:], constraints)
  if best is None:
    print(f"no config satisfies {constraints}")
    return 1
  name, (k, (lam, gam, tau, beta)), m = best
  print(f"chosen: {name}")
  if args.out:
    atomic_write_json(args.out, {
        "_comment": (f"AIRConfig overrides per method, chosen by organism.tune_air on {args.dev_root} (lowest C_S "
                     f"subject to {constraints}); heads: top-{k} by S_h."),
        "_dev_metrics": {key: round(float(v), 4) for key, v in m.items() if key in (
            "CHAIRs", "CHAIRi", "Recall", "Precision", "F1", "malformed")},
        "_dev_greedy": {key: round(float(v), 4) for key, v in rows[0][2].items() if key in (
            "CHAIRs", "CHAIRi", "Recall", "Precision", "F1", "malformed")},
        "air": {"visual_factor": lam, "text_factor": gam, "tau_text": tau, "beta": beta}}, indent=2, newline=True)
  return 0


if __name__ == "__main__":
  from eval.cli import run_cli

  raise SystemExit(run_cli(main))  # user and file-system errors: one `error:` line, status 2
