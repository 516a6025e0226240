"""HALC on the model organism with an oracle detector: CHAIR and time per caption beside greedy, one process.

Usage: python -m bench.halc_organism [--num-images 100] [--batch 8] [--max-new-tokens 64] [--json PATH]

The organism (organism/checkpoint, a trained tiny LLaVA that writes real captions and hallucinates absent group
members) captions held-out test scenes (seed 0) with greedy and with the HALC preset. No detector checkpoint can be
downloaded here, so the grounding detector is an oracle: it finds the scene of the image it is shown and returns
the scene's boxes of the objects of the queried word's class (none when the object is absent, so the word gets
the official fallback box). This measures what HALC's focal contrast does when grounding is perfect, and its cost
at a real object-word rate (on a tiny model, where the per-step overhead dominates).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

PROMPT = "Please describe this image in detail."


class OracleDetector:
  """Boxes of the queried class in the scene whose rendering is closest to the image (exact for organism
  images)."""

  identity = "organism-oracle"

  def __init__(self, images: np.ndarray, scenes, vocab):
    from organism.scenes import object_boxes

    self.images = images.astype(np.int16)
    self.boxes = [object_boxes(s, images.shape[1]) for s in scenes]
    self.vocab = vocab

  def detect(self, image, words, threshold):
    from air_jax.detectors import Detection

    arr = np.asarray(image.convert("RGB").resize(self.images.shape[1:3][::-1]), np.int16)
    k = int(np.argmin(np.abs(self.images - arr[None]).reshape(len(self.images), -1).sum(-1)))
    out = []
    for word in words:
      cls = self.vocab.category_of(word)
      boxes = [[x, y, x + w, y + h] for name, (x, y, w, h), _ in self.boxes[k] if name == cls]
      out.append(Detection(word=word, boxes=np.asarray(boxes, np.float64).reshape(-1, 4),
                           scores=np.ones(len(boxes))))
    return out


def main(argv=None):
  from PIL import Image

  import air_jax
  from air_jax.atomic import atomic_write_json
  from bench.common import machine, table
  from eval.chair_metric import Vocabulary, compute_chair
  from eval.organism_default import CHECKPOINT
  from organism.dataset import make_arrays
  from organism.vocab import write_synonyms

  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--num-images", type=int, default=100)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--max-new-tokens", type=int, default=64)
  ap.add_argument("--json", default=os.path.join("bench", "results", "halc_organism.json"))
  args = ap.parse_args(argv)
  out_dir = os.path.dirname(os.path.abspath(args.json))
  os.makedirs(out_dir, exist_ok=True)
  syn = os.path.join(out_dir, "organism_synonyms.txt")
  write_synonyms(syn)
  vocab = Vocabulary.from_file(syn)
  images, _, scenes = make_arrays(args.num_images, 0, "test")
  pil = [Image.fromarray(im) for im in images]
  model = air_jax.load_pretrained(str(CHECKPOINT))
  halc = air_jax.methods.make("halc", detector=OracleDetector(images, scenes, vocab), synonyms=syn)
  gt = {i: list(s.names) for i, s in enumerate(scenes)}
  res = {}
  for name, cfg in (("greedy", None), ("halc", halc)):
    kw = dict(max_new_tokens=args.max_new_tokens)
    air_jax.generate(model, cfg, pil[: args.batch], PROMPT, **kw)  # compile (and warm) once
    texts, t = [], time.perf_counter()
    for i in range(0, len(pil), args.batch):
      chunk = pil[i:i + args.batch]
      chunk = chunk + [chunk[0]] * (args.batch - len(chunk))  # one compiled batch shape
      texts += air_jax.generate(model, cfg, chunk, PROMPT, **kw).texts[: min(args.batch, len(pil) - i)]
    seconds = time.perf_counter() - t
    m = compute_chair([{"image_id": i, "caption": c} for i, c in enumerate(texts)], gt, vocab)["overall_metrics"]
    res[name] = {"seconds_per_caption": seconds / len(pil), **{k: m[k] for k in ("CHAIRs", "CHAIRi", "Recall")}}
  g = res["greedy"]["seconds_per_caption"]
  rows = [(k, f"{100 * v['CHAIRs']:.1f}", f"{100 * v['CHAIRi']:.1f}", f"{100 * v['Recall']:.1f}",
           f"{1e3 * v['seconds_per_caption']:.1f}", f"{v['seconds_per_caption'] / g:.2f}") for k, v in res.items()]
  print(f"machine: {machine()}; {args.num_images} organism test scenes, batch {args.batch}, "
        f"{args.max_new_tokens} new tokens")
  print(table(rows, ("method", "C_S", "C_I", "recall", "ms/caption", "vs greedy")))
  atomic_write_json(args.json, {"machine": machine(), "num_images": args.num_images, "batch": args.batch,
                                "max_new_tokens": args.max_new_tokens, "methods": res}, indent=1)
  print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
