"""How well the gradient screen ranks heads: Spearman correlation of its estimate with exact ablation.

Usage: python -m bench.screen_rank [--organism-images 40]

Two models: the embedded organism (greedy captions of its held-out scenes, CHAIR-scored with its vocabulary)
and a tiny random LLaVA (tests/tiny.py; hand-written captions of the COCO test fixture). For every caption, the
exact Delta P of every head (attribution_core, prefix reuse) and the screen's first-order estimate (one batched
backward pass per token) at every scored token; reported per semantics: Spearman over all (token, head) pairs,
over heads of S_h (mean over hallucinated minus mean over correct tokens), and the overlap of the top-k heads by
|S_h|.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import table

ROOT = Path(__file__).resolve().parent.parent


def _pairs(model, chair_json: Path, coco_root: str, split: str, semantics: str):
  from air_jax.attribution import Attributor
  from air_jax.attribution_stats import HeadStats
  from eval.coco import CocoImages, match_image_id

  images = CocoImages(coco_root, split)
  att = Attributor(model, semantics=semantics)
  sentences = json.loads(chair_json.read_text())["sentences"]
  exact, est = [], []
  s_exact = HeadStats.zeros(att.num_layers, att.num_heads)
  s_est = HeadStats.zeros(att.num_layers, att.num_heads)
  t_exact = t_screen = 0.0
  for s in sentences:
    image = images.image_path(match_image_id(s["image_id"], images.file_names))
    t = time.perf_counter()
    r = att.attribute(image, s)
    t_exact += time.perf_counter() - t
    if not r.scored:
      continue
    t = time.perf_counter()
    g = att.screen(image, s)
    t_screen += time.perf_counter() - t
    exact.append(r.deltas("prob"))
    est.append(g.screen_deltas("prob"))
    r.accumulate(s_exact, "prob")
    g.accumulate(s_est, "prob", screen=True)
  return np.concatenate(exact), np.concatenate(est), s_exact.s_score(), s_est.s_score(), t_exact, t_screen


def _report(name, model, chair_json, coco_root, split, k):
  from scipy.stats import spearmanr

  rows = []
  for semantics in ("current_token", "full_sequence"):
    exact, est, s_exact, s_est, t_exact, t_screen = _pairs(model, chair_json, coco_root, split, semantics)
    ok = ~np.isnan(s_exact.ravel()) & ~np.isnan(s_est.ravel())
    rho_tok = spearmanr(exact.ravel(), est.ravel())[0]
    rho_s = spearmanr(s_exact.ravel()[ok], s_est.ravel()[ok])[0] if ok.sum() > 2 else float("nan")
    top = lambda a: set(np.argsort(-np.abs(np.nan_to_num(a.ravel())), kind="stable")[:k].tolist())
    overlap = len(top(s_exact) & top(s_est))
    rows.append((name, semantics, exact.shape[0], f"{rho_tok:.3f}", f"{rho_s:.3f}", f"{overlap}/{k}",
                 f"{t_exact:.1f}", f"{t_screen:.1f}"))
  return rows


def organism_case(n: int, out: Path):
  import air_jax
  from eval.chair import run as chair_run
  from eval.organism_default import CHECKPOINT

  chair_run(["--method", "greedy", "--num-images", str(n), "--out", str(out), "--no-progress"])
  root = out / "organism_data"
  return air_jax.load_pretrained(str(CHECKPOINT)), out / "greedy_chair.json", str(root), "test"


def tiny_case(out: Path):
  import air_jax
  from eval.chair import run as chair_run
  from tests.test_attribute_cli import CAPTIONS, FIXTURE
  from tests.tiny import make_tiny_llava

  make_tiny_llava(str(out / "tiny"), text_layers=3)
  caps = out / "hand_captions.jsonl"
  caps.write_text("".join(json.dumps(c) + "\n" for c in CAPTIONS))
  chair_run(["--coco-root", str(FIXTURE), "--captions", str(caps), "--method", "hand", "--out", str(out),
             "--no-progress"])
  return air_jax.load_pretrained(str(out / "tiny")), out / "hand_chair.json", str(FIXTURE), "val2014"


def main(argv=None):
  import sys

  sys.path.insert(0, str(ROOT))
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--organism-images", type=int, default=40)
  ap.add_argument("--top-k", type=int, default=8)
  args = ap.parse_args(argv)
  rows = []
  with tempfile.TemporaryDirectory() as d:
    rows += _report("organism (4 x 8 heads)", *organism_case(args.organism_images, Path(d) / "org"), args.top_k)
    rows += _report("tiny LLaVA (3 x 4 heads)", *tiny_case(Path(d) / "tiny"), min(args.top_k, 4))
  print(table(rows, ("model", "semantics", "tokens", "rho (token, head)", "rho S_h", "top-k overlap",
                     "exact s", "screen s")))


if __name__ == "__main__":
  main()
