"""Decode speed: air-jax vs transformers (torch, 2 threads, its own KV-cached greedy loop), same model, one run.

Usage: python -m bench.decode [--new-tokens 32] [--methods greedy,air,air_star,adhh] [--model llava|next]
(--model next: the LLaVA-NeXT-shaped mid model of bench.common.build_next, anyres with 5 tiles)
Prints prefill time, decode ms/token (best of several runs on both sides), compile time, ours/theirs, and the
memory-bandwidth bound
(bytes of weights + KV cache read per decode step / measured read bandwidth).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import build, machine, read_bandwidth_gbs, table


def torch_decode(model, ids, pixels, n: int, repeats: int = 3, extra: dict | None = None):
  """transformers' own KV-cached greedy loop; best of `repeats` runs after a warm-up (extra: prefill kwargs)."""
  import torch

  torch.set_num_threads(2)
  input_ids = torch.as_tensor(ids, dtype=torch.long)
  pv = torch.as_tensor(pixels)
  extra = extra or {}
  best_pre, best_dec = float("inf"), float("inf")
  with torch.no_grad():
    model(input_ids=input_ids, pixel_values=pv, use_cache=True, **extra)  # warm-up
    for _ in range(repeats):
      t0 = time.perf_counter()
      out = model(input_ids=input_ids, pixel_values=pv, use_cache=True, **extra)
      t1 = time.perf_counter()
      past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
      tokens = [int(tok)]
      for _ in range(n - 1):
        out = model(input_ids=tok, past_key_values=past, use_cache=True)
        past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(tok))
      t2 = time.perf_counter()
      best_pre, best_dec = min(best_pre, t1 - t0), min(best_dec, (t2 - t1) / (n - 1) * 1e3)
  return {"prefill_s": best_pre, "decode_ms": best_dec, "tokens": tokens}


class JaxDecoder:
  """One compiled generation (and prefill) for a spec; `time_once` measures a run."""

  def __init__(self, ours, params, ids, pixels, n: int, spec=None):
    from air_jax import decoding

    config = ours.config
    sv = decoding.SamplingValues.make(0)
    kw = dict(max_new_tokens=n, eos_ids=(), pad_id=0)
    gen = jax.jit(lambda p, i, m, x, s: decoding.generate_tokens(p, config, i, m, x, s, sv, **kw))
    pre = jax.jit(lambda p, i, m, x, s: decoding.prefill(p, config, i, m, x, s, ids.shape[1] + n)[0])
    self.n = n
    self.args = (params, jnp.asarray(ids), jnp.asarray(np.ones_like(ids)), jax.tree.map(jnp.asarray, pixels), spec)
    t = time.perf_counter()
    self.gen = gen.lower(*self.args).compile()
    self.compile_s = time.perf_counter() - t
    self.pre = pre
    pre(*self.args).block_until_ready()
    self.out = jax.block_until_ready(self.gen(*self.args))
    assert int(self.out["steps"]) == n
    self.best_pre = self.best_total = float("inf")

  def time_once(self) -> None:
    t = time.perf_counter()
    self.pre(*self.args).block_until_ready()
    self.best_pre = min(self.best_pre, time.perf_counter() - t)
    t = time.perf_counter()
    jax.block_until_ready(self.gen(*self.args))
    self.best_total = min(self.best_total, time.perf_counter() - t)

  def result(self) -> dict:
    return {"prefill_s": self.best_pre, "decode_ms": (self.best_total - self.best_pre) / (self.n - 1) * 1e3,
            "compile_s": self.compile_s, "tokens": [int(x) for x in np.asarray(self.out["tokens"][0])]}


def step_bytes(ours, ids, n: int) -> int:
  """Bytes read per decode step: decoder weights, final norm, lm_head, and the KV cache."""
  lm = ours.params["language_model"]
  w = sum(x.nbytes for x in jax.tree.leaves(lm["layers"])) + lm["norm"]["weight"].nbytes
  head = ours.params.get("lm_head", {"weight": lm["embed_tokens"]["weight"]})["weight"].nbytes
  t = ours.config.dims
  cache = 2 * t.num_hidden_layers * (ids.shape[1] + n) * t.num_key_value_heads * t.head_dim * 4
  return w + head + cache


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--new-tokens", type=int, default=32)
  ap.add_argument("--methods", default="greedy,air,air_star,adhh",
                  help="comma separated; AIR methods need air_jax.AIRConfig")
  ap.add_argument("--rounds", type=int, default=5, help="timed runs per method (best is reported)")
  ap.add_argument("--model", choices=("llava", "next"), default="llava",
                  help="llava: the LLaVA-1.5-shaped mid model; next: LLaVA-NeXT-shaped, anyres with 5 tiles")
  args = ap.parse_args(argv)
  n = args.new_tokens
  if args.model == "next":
    from bench.common import build_next

    model, ours, ids, pixels, torch_in = build_next()
    torch_pixels, extra = torch_in.pop("pixels"), torch_in
  else:
    model, ours, ids, pixels = build()
    torch_pixels, extra = pixels, {}
  n_img = int((ids == 32000).sum())
  print(f"machine: {machine()}; jax {jax.__version__} on {jax.devices()[0].platform}; model {args.model}; prompt "
        f"{ids.shape[1]} tokens ({n_img} image), {n} new tokens, float32")
  ref = torch_decode(model, ids, torch_pixels, n, extra=extra)
  compare(ours, ids, pixels, n, args.methods.split(","), args.rounds, ref)


def compare(ours, ids, vision, n: int, methods, rounds: int, ref: dict) -> None:
  """Times our compiled generation per method (round robin, best of `rounds`) and prints it beside `ref`
  (transformers' prefill_s / decode_ms / tokens), the bandwidth bound, and whether greedy tokens are identical."""
  bw = read_bandwidth_gbs()
  bound_ms = step_bytes(ours, ids, n) / (bw * 1e9) * 1e3
  params = ours.family.per_layer_params(ours.params)  # as generate on CPU
  decoders = {}
  for method in methods:
    spec = None
    if method != "greedy":
      from air_jax.air_config import AIRConfig

      d = ours.config.dims
      heads = [(l, h) for l in range(d.num_hidden_layers) for h in range(0, d.num_attention_heads, 4)]
      spec = AIRConfig.preset(method, heads=heads).compile(ours.config)
    decoders[method] = JaxDecoder(ours, params, ids, vision, n, spec)
  for _ in range(rounds):  # round robin, best per method: machine noise hits every method alike
    for method in methods:
      decoders[method].time_once()
  rows, results = [], {}
  for method in methods:
    r = results[method] = decoders[method].result()
    rows.append((f"air-jax {method}", f"{r['prefill_s']*1e3:.0f}", f"{r['decode_ms']:.1f}", f"{r['compile_s']:.1f}",
                 f"{r['decode_ms'] / ref['decode_ms']:.2f}", f"{r['decode_ms'] / bound_ms:.2f}",
                 f"{r['decode_ms'] / results['greedy']['decode_ms']:.3f}" if "greedy" in results else "-"))
  rows.insert(0, ("transformers (torch, eager)", f"{ref['prefill_s']*1e3:.0f}", f"{ref['decode_ms']:.1f}", "-",
                  "1.00", f"{ref['decode_ms'] / bound_ms:.2f}", "-"))
  print(table(rows, ("implementation", "prefill ms", "decode ms/token", "compile s", "vs transformers",
                     "vs bound", "vs greedy")))
  print(f"bandwidth bound: {step_bytes(ours, ids, n) / 1e6:.0f} MB per step / {bw:.1f} GB/s = {bound_ms:.1f} ms/token")
  if "greedy" in results:
    same = results["greedy"]["tokens"] == ref["tokens"]
    print(f"greedy tokens identical to transformers: {same}")

if __name__ == "__main__":
  main()
