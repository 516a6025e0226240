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


def test_attribution_traces_for_the_roofline(tiny_model):
  """head_logprobs(lower="trace") gives the jaxpr of the computation it would run: its matrix products are at
  least those of the clean forward (the prefix) and grow with the ablations."""
  import numpy as np

  from air_jax.attribution_core import head_logprobs
  from bench.common import jaxpr_matmul_gflop

  ids = np.asarray(tiny_model.processor.tokenizer("hello there world")["input_ids"], np.int32)
  cfg = tiny_model.config
  size = cfg.vision.image_size
  pixels = np.zeros((1, 3, size, size), np.float32)
  ids = np.concatenate([ids[:1], np.full(cfg.num_image_tokens, cfg.image_token_id, np.int32), ids[1:]])
  p = len(ids) - 1
  trace = lambda **kw: jaxpr_matmul_gflop(head_logprobs(tiny_model.params, cfg, ids, pixels, [p], lower="trace",
                                                         **kw).jaxpr)
  # full_sequence's plain path runs one whole forward per gate (the clean run is gate -1)
  one, every = trace(semantics="full_sequence", heads=[0]), trace(semantics="full_sequence", reuse=False)
  nl, nh = cfg.dims.num_hidden_layers, cfg.dims.num_attention_heads
  assert abs(every / one - (1 + nl * nh) / 2) < 0.05 * every / one
  # current_token: one clean forward plus single rows, far less than a forward per head
  assert 0 < trace() < every / 2
