"""Compile time of the whole generation graph per method on the mid-size model (per-layer or stacked layout).

Usage: python -m bench.compile_time [--methods greedy,air,air_star,adhh] [--new-tokens 16] [--layout stacked]

--layout per_layer (default) is what `generate` uses on CPU; stacked is the GPU/TPU layout (layers scanned).

Each method's `decoding.generate_tokens_jit` is traced, lowered and compiled once (nothing cached between
methods: their specs differ in structure); prints the wall seconds of each stage, the CPU seconds of the whole
(steadier on a shared machine), their ratios to greedy, and the number of fused kernels XLA emitted.
"""

from __future__ import annotations

import argparse
import time

import jax.numpy as jnp

from bench.common import build, machine, table


def main(argv=None):
  from air_jax import decoding
  from air_jax.air_config import AIRConfig
  from models.llama import unstack_layers

  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--methods", default="greedy,air,air_star,adhh")
  ap.add_argument("--new-tokens", type=int, default=16)
  ap.add_argument("--layout", choices=("per_layer", "stacked"), default="per_layer")
  args = ap.parse_args(argv)
  _, loaded, ids, pixels = build()
  cfg = loaded.config
  nl, nh = cfg.text.num_hidden_layers, cfg.text.num_attention_heads
  params = loaded.params
  if args.layout == "per_layer":
    params = dict(params, language_model=unstack_layers(params["language_model"]))
  sv = decoding.SamplingValues.make(0)
  heads = [[l, h] for l in range(nl) for h in range(0, nh, 5)]
  print(f"machine: {machine()}; {nl} layers x {nh} heads, prompt {ids.shape[1]} tokens, {args.new_tokens} new, "
        f"{args.layout} layout")
  rows, base = [], None
  # Warm-up (not reported): the first compilation in a process also pays one-time backend costs.
  warm = (params, cfg, jnp.asarray(ids), jnp.ones_like(jnp.asarray(ids)), jnp.asarray(pixels), None, sv)
  decoding.generate_tokens_jit.lower(*warm, max_new_tokens=2, eos_ids=(), pad_id=0).compile()
  for name in args.methods.split(","):
    spec = None if name == "greedy" else AIRConfig.preset(name, heads=heads).compile(cfg)
    call = (params, cfg, jnp.asarray(ids), jnp.ones_like(jnp.asarray(ids)), jnp.asarray(pixels), spec, sv)
    t0, c0 = time.perf_counter(), time.process_time()
    low = decoding.generate_tokens_jit.lower(*call, max_new_tokens=args.new_tokens, eos_ids=(), pad_id=0)
    t1 = time.perf_counter()
    compiled = low.compile()
    t2, c2 = time.perf_counter(), time.process_time()
    kernels = compiled.as_text().count(" fusion(")
    base = base or (t2 - t0, c2 - c0)
    rows.append((name, f"{t1 - t0:.1f}", f"{t2 - t1:.1f}", f"{(t2 - t0) / base[0]:.2f}", f"{c2 - c0:.1f}",
                 f"{(c2 - c0) / base[1]:.2f}", str(kernels)))
  # CPU seconds are the steadier measure on a shared machine (wall time also counts other processes' turns).
  print(table(rows, ("method", "trace + lower s", "compile s", "wall vs greedy", "CPU s", "CPU vs greedy",
                     "fused kernels")))


if __name__ == "__main__":
  main()
