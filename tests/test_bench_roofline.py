"""The benchmarks' roofline: matrix-product work counted on the jaxpr, through nested calls, scans and conds."""

import jax
import jax.numpy as jnp
from jax import lax

from bench.common import matmul_gflop


def flops(fn, *args) -> int:
  return round(matmul_gflop(fn, *args) * 1e9)


def test_counts_products_through_nesting():
  a, b = jnp.ones((3, 4)), jnp.ones((4, 5))
  assert flops(lambda x, y: x @ y, a, b) == 2 * 3 * 4 * 5
  # batched einsum: 7 products of [3, 4] x [4, 5]
  assert flops(lambda x, y: jnp.einsum("bik,bkj->bij", x, y), jnp.ones((7, 3, 4)), jnp.ones((7, 4, 5))) == 7 * 2 * 3 * 4 * 5
  inner = jax.jit(lambda x, y: x @ y)
  assert flops(lambda x, y: inner(x, y) + inner(x, y), a, b) == 2 * 2 * 3 * 4 * 5

  def scanned(x, w):
    return lax.scan(lambda h, _: (h @ w, None), x, None, length=6)[0]

  assert flops(scanned, jnp.ones((3, 4)), jnp.ones((4, 4))) == 6 * 2 * 3 * 4 * 4
  # cond: the larger branch
  both = lambda p, x, y: lax.cond(p, lambda: ((x @ y) @ y.T) @ y, lambda: x @ y)
  assert flops(both, True, a, b) == 2 * 3 * 4 * 5 + 2 * 3 * 5 * 4 + 2 * 3 * 4 * 5
  assert flops(lambda x: jnp.tanh(x) * 2, a) == 0  # element-wise work is not counted


def test_counts_convolutions():
  x, k = jnp.ones((2, 3, 8, 8)), jnp.ones((6, 3, 2, 2))  # NCHW, OIHW, stride 2: [2, 6, 4, 4]
  conv = lambda x, k: lax.conv_general_dilated(x, k, (2, 2), "VALID")
  assert flops(conv, x, k) == 2 * (2 * 6 * 4 * 4) * (3 * 2 * 2)
