"""Why extra batch rows cost more than bandwidth predicts on XLA:CPU: x [M, E] @ W[V, E]^T for M = 1, 2, 4, 8.

Usage: python -m bench.small_gemm
Decoding is bandwidth-bound, so a second row (VCD's noised view, PAI's text-only view) or eight early-exit rows
(DoLa) should cost little more than one. XLA:CPU runs M = 1 as a matrix-vector product near memory bandwidth but
M >= 2 as a GEMM several times slower per byte; this prints both (best of 20, ms and effective GB/s).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import table


def main():
  rng = np.random.default_rng(0)
  shapes = {"mlp 2816 x 1024": (2816, 1024), "lm_head 32064 x 1024": (32064, 1024)}
  f = jax.jit(lambda x, w: jnp.einsum("be,ve->bv", x, w))
  rows = []
  for name, shape in shapes.items():
    w = jnp.asarray(rng.standard_normal(shape, np.float32))
    for m in (1, 2, 4, 8):
      x = jnp.asarray(rng.standard_normal((m, shape[1]), np.float32))
      f(x, w).block_until_ready()
      best = float("inf")
      for _ in range(20):
        t = time.perf_counter()
        f(x, w).block_until_ready()
        best = min(best, time.perf_counter() - t)
      rows.append((name, m, f"{best * 1e3:.2f}", f"{w.nbytes / best / 1e9:.1f}"))
  print(table(rows, ("weight", "rows M", "ms", "GB/s")))


if __name__ == "__main__":
  main()
