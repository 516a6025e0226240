"""Generation time of every decoding method relative to greedy (the AIR paper's supplementary C.3, Figure 2).

Usage: python -m bench.methods [--new-tokens 64] [--rounds 5] [--methods greedy,air,...,opera] [--json PATH]

The mid-size random LLaVA of bench/common.py, one process, float32, batch 1 (as the paper's timing). Per
method: the whole caption (prefill + N tokens, EOS ignored so every method makes N steps) and the decode cost
per token ((caption - caption of 1 token) / (N - 1)), best of `rounds` round-robin runs, as ratios to greedy,
beside the paper's Figure 2 ratios (seconds per sample / greedy's 2.8 s). Writes JSON to --json:
{"model": str, "methods": {name: {"ms_per_token", "caption_s", "ratio", "paper_ratio"}}} where ratio is the
caption-time ratio to greedy (the quantity of Figure 2), plus the per-token ratio and settings for reference.
Methods that bring their own search (OPERA: 5 beams, 5 candidates) also report their roll-backs: `rollbacks`,
`iterations` (loop steps, N + redone steps) and `rollback_rate` (roll-backs per generated token).
HALC runs with stand-ins the random model lacks (a tokenizer spelling id i as the word "t{i}", a constant-time
detector with one box per word, object words chosen to give ~1 object mention per 16 greedy tokens) and reports
`object_words` (checked: detector + one batched FOV forward each) and `corrections` (words rolled back); its
`compile_s` is the time of its first (warm-up) runs, compilation included. HALC is not in the default list (on CPU
a caption takes minutes): add it with --methods.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from air_jax.atomic import atomic_write_json
from bench.common import build, machine, table

# Figure 2 of the AIR supplementary: seconds per sample; greedy 2.8 s.
PAPER_SECONDS = {"greedy": 2.8, "air": 3.4, "adhh": 3.2, "farsight": 4.1, "dola": 4.2, "vcd": 5.3, "halc": 28.6,
                 "opera": 25.0}
DEFAULT_METHODS = "greedy,air,air_star,adhh,vcd,dola,pai,farsight,opera"  # + halc: minutes per caption on CPU
MODEL = ("random LLaVA (bench/common.py): CLIP 224/14 4 layers, Llama 1024 wide, 8 layers x 16 heads, vocab 32064, "
         "float32")


def paper_ratio(name: str) -> float | None:
  s = PAPER_SECONDS.get(name)
  return None if s is None else round(s / PAPER_SECONDS["greedy"], 2)


def method_config(name: str, config):
  """The registry preset; the AIR family gets every 4th head of every layer as its sensitive heads."""
  from air_jax import methods

  t = config.text
  heads = [(l, h) for l in range(t.num_hidden_layers) for h in range(0, t.num_attention_heads, 4)]
  return methods.make(name, run_options={"heads": heads})


class Timed:
  """Compiled generations of N tokens and of 1 token for one method."""

  def __init__(self, ours, params, ids, pixels, n: int, cfg):
    from air_jax import decoding, methods

    config = ours.config
    compiled = methods.as_compiled(cfg, config)
    sv = decoding.SamplingValues.make(0)
    args = (params, jnp.asarray(ids), jnp.asarray(np.ones_like(ids)), jnp.asarray(pixels), compiled)

    def make(steps):
      fn = jax.jit(lambda p, i, m, x, c: decoding.generate_tokens(p, config, i, m, x, c, sv, max_new_tokens=steps,
                                                                  eos_ids=(), pad_id=0))
      return fn.lower(*args).compile()

    out = self._build(make, args, n)
    assert int(out["steps"]) == n

  def _build(self, make, args, n: int) -> dict:
    """Compiles make(n) and make(1) (timed), runs both once, resets the timings; returns the n-token output."""
    t = time.perf_counter()
    self.full, self.one = make(n), make(1)
    self.compile_s = time.perf_counter() - t
    self.args, self.n = args, n
    out = jax.block_until_ready(self.full(*args))
    jax.block_until_ready(self.one(*args))
    self.best_full = self.best_one = float("inf")
    return out

  def time_once(self) -> None:
    t = time.perf_counter()
    jax.block_until_ready(self.one(*self.args))
    self.best_one = min(self.best_one, time.perf_counter() - t)
    t = time.perf_counter()
    jax.block_until_ready(self.full(*self.args))
    self.best_full = min(self.best_full, time.perf_counter() - t)

  @property
  def ms_per_token(self) -> float:
    return max(self.best_full - self.best_one, 0.0) / (self.n - 1) * 1e3


class TimedSearch(Timed):
  """A method that brings its own search (OPERA): its compiled search over N tokens and over 1 token, EOS ignored.

  Also records the roll-backs of the N-token caption (`rollbacks`, and `iterations` of its loop: N + redone steps).
  """

  def __init__(self, ours, params, ids, pixels, n: int, cfg):  # noqa: D107 (no super: another compiled function)
    from air_jax import methods
    from air_jax.opera_search import opera_search

    config = ours.config
    compiled = methods.as_compiled(cfg, config)
    plan = compiled.plan
    args = (params, jnp.asarray(ids), jnp.asarray(np.ones_like(ids)), jnp.asarray(pixels), compiled.values)

    def make(steps):
      fn = jax.jit(lambda p, i, m, x, v: opera_search(p, config, i, m, x, v, num_beams=plan.num_beams,
                                                      num_candidates=plan.num_candidates, max_new_tokens=steps,
                                                      eos_ids=(), pad_id=0,
                                                      early_stopping=plan.early_stopping))
      return fn.lower(*args).compile()

    out = self._build(make, args, n)
    assert int(out["num_tokens"][0]) == n
    self.rollbacks, self.iterations = int(out["rollbacks"][0]), int(out["iterations"][0])


class BenchTokenizer:
  """A stand-in tokenizer for the random bench model (it has none): id i spells the word "t{i}"."""

  all_special_ids = [0, 1, 2]

  def __init__(self, size: int):
    self.size = size

  def __len__(self):
    return self.size

  def convert_ids_to_tokens(self, ids):
    return [f"<s{i}>" if i in self.all_special_ids else f"▁t{i}" for i in ids]

  def decode(self, ids, skip_special_tokens=True):
    return " ".join(f"t{int(i)}" for i in ids if int(i) not in self.all_special_ids or not skip_special_tokens)


class BenchDetector:
  """A constant-time stand-in for the grounding detector: one box per word, so every object word takes the
  detected path (crop, FOV forward). A real detector adds its own time per object word."""

  identity = "bench-stub"

  def detect(self, image, words, threshold):
    from air_jax.detectors import Detection

    w, h = image.size
    box = np.array([[0.3 * w, 0.25 * h, 0.6 * w, 0.7 * h]])
    return [Detection(word=word, boxes=box, scores=np.ones(1)) for word in words]


def halc_setup(ours, params, ids, pixels, n: int, out_dir: str):
  """(HALC config, processor stand-in): the object word is the greedy caption's word mentioned closest to once per
  16 tokens (a random model writes no English; LLaVA-1.5's 64-token captions name about 4 objects). Corrections
  change the caption, so the words actually checked are counted and reported."""
  import collections
  import types

  from air_jax import decoding, methods

  tok = BenchTokenizer(ours.config.dims.vocab_size)
  processor = types.SimpleNamespace(tokenizer=tok, image_processor=types.SimpleNamespace(
      image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711]))
  out = decoding.generate_tokens_jit(params, ours.config, jnp.asarray(ids), jnp.asarray(np.ones_like(ids)),
                                     jnp.asarray(pixels), None, decoding.SamplingValues.make(0), max_new_tokens=n,
                                     eos_ids=(), pad_id=0)
  counts = collections.Counter(np.asarray(out["tokens"])[0].tolist())
  word = min(counts, key=lambda t: (abs(counts[t] - n / 16), t))
  path = os.path.join(out_dir, "halc_bench_synonyms.txt")
  with open(path, "w") as f:
    f.write(f"t{word}\n")
  return methods.make("halc", detector=BenchDetector(), synonyms=path), processor


class TimedHalc(Timed):
  """HALC's search (host loop over compiled pieces) over N tokens and over 1 token, EOS ignored; records the
  object words checked and the corrections of the N-token caption."""

  def __init__(self, ours, params, ids, pixels, n: int, cfg, processor):  # noqa: D107
    from air_jax import methods

    compiled = methods.as_compiled(cfg, ours.config)
    args = (compiled.values, params, ours.config, jnp.asarray(ids), jnp.asarray(np.ones_like(ids)),
            jnp.asarray(pixels))

    def make(steps):
      return lambda: compiled.plan.search(*args, max_new_tokens=steps, eos_ids=(), pad_id=0, processor=processor)

    t = time.perf_counter()
    self.full, self.one = make(n), make(1)
    out = self.full()
    self.one()
    self.compile_s = time.perf_counter() - t
    assert int(out["num_tokens"][0]) == n
    self.checked, self.corrections = int(out["checked"][0]), int(out["corrections"][0])
    self.args, self.n = (), n  # Timed.time_once calls the searches without arguments
    self.best_full = self.best_one = float("inf")


def timed(ours, params, ids, pixels, n: int, cfg):
  """Timed, or TimedSearch for a method that brings its own search."""
  from air_jax import methods

  searches = methods.as_compiled(cfg, ours.config).plan.searches
  return (TimedSearch if searches else Timed)(ours, params, ids, pixels, n, cfg)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--new-tokens", type=int, default=64)
  ap.add_argument("--rounds", type=int, default=5, help="timed runs per method (best is reported)")
  ap.add_argument("--methods", default=DEFAULT_METHODS, help="comma separated registry names (greedy first)")
  ap.add_argument("--json", default=os.path.join("bench", "results", "methods.json"))
  args = ap.parse_args(argv)
  names = [m.strip() for m in args.methods.split(",") if m.strip()]
  if names[0] != "greedy":
    names = ["greedy"] + [m for m in names if m != "greedy"]
  n = args.new_tokens
  if n < 2:
    raise SystemExit("--new-tokens must be at least 2")
  _, ours, ids, pixels = build()
  print(f"machine: {machine()}; jax {jax.__version__} on {jax.devices()[0].platform}; prompt {ids.shape[1]} "
        f"tokens (256 image), {n} new tokens, batch 1, float32")
  from models.llama import unstack_layers

  params = dict(ours.params, language_model=unstack_layers(ours.params["language_model"]))  # as generate on CPU
  runs = {}
  for m in names:
    if m == "halc":  # needs a tokenizer, a detector and object words: stand-ins for the random model
      cfg, processor = halc_setup(ours, params, ids, pixels, n, os.path.dirname(os.path.abspath(args.json)))
      runs[m] = TimedHalc(ours, params, ids, pixels, n, cfg, processor)
    else:
      runs[m] = timed(ours, params, ids, pixels, n, method_config(m, ours.config))
  for _ in range(args.rounds):  # round robin: machine noise hits every method alike
    for m in names:
      runs[m].time_once()
  g = runs["greedy"]
  rows, out = [], {}
  for m in names:
    r = runs[m]
    ratio, tok_ratio, pr = r.best_full / g.best_full, r.ms_per_token / g.ms_per_token, paper_ratio(m)
    out[m] = {"ms_per_token": round(r.ms_per_token, 3), "caption_s": round(r.best_full, 4), "ratio": round(ratio, 3),
              "paper_ratio": pr, "token_ratio": round(tok_ratio, 3), "compile_s": round(r.compile_s, 1)}
    if isinstance(r, TimedSearch):  # roll-back rate: roll-backs per generated token of the caption
      out[m].update(rollbacks=r.rollbacks, iterations=r.iterations, rollback_rate=round(r.rollbacks / n, 4))
      print(f"{m}: {r.rollbacks} roll-backs in {n} tokens ({r.iterations} loop iterations)")
    if isinstance(r, TimedHalc):
      out[m].update(object_words=r.checked, corrections=r.corrections)
      print(f"{m}: {r.checked} object words checked (detector + FOV forward), {r.corrections} corrected, in {n} "
            "tokens")
    rows.append((m, f"{r.ms_per_token:.1f}", f"{tok_ratio:.2f}", f"{r.best_full:.2f}", f"{ratio:.2f}",
                 "-" if pr is None else f"{pr:.2f}", f"{r.compile_s:.1f}"))
  print(table(rows, ("method", "decode ms/token", "vs greedy", "caption s", "vs greedy", "paper (Fig. 2)",
                     "compile s")))
  data = {"model": MODEL, "machine": machine(), "new_tokens": n, "prompt_tokens": int(ids.shape[1]), "methods": out}
  os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
  atomic_write_json(args.json, data, indent=1)
  print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
