"""Attention intervention sites. The model calls these three functions; interventions live here, not in it.

Sites (TransformerLens-style), per layer:
  edit_scores(scores [B, H, T, S] float32, spec_l, ctx)  logits after the 1/sqrt(d) scale, before mask/softmax
  edit_pattern(pattern [B, H, T, S] float32, spec_l, ctx) probabilities after softmax
  edit_z(z [B, T, H, D], spec_l, ctx)                      per-head outputs before the output projection
`spec_l` is the layer's slice of a RectificationSpec (or None: nothing to do). Each edit is written so that a
neutral spec returns its input unchanged, bit for bit: every op ends in `jnp.where(edited, new, old)`, so a head
or row that an op does not select keeps its exact input.

AIR ops (`spec_l.ops`, an `models.spec.AIROps`), in order of application. "Visible" = ctx.mask (causal and not
padding); key segments come from ctx.key_segments (system / image / text, PAD); text = TEXT keys (everything after
the image, generated tokens included). Which query rows an op edits is its row rule (see models.spec).

scores site (pre-mask logits s):
  qk_rescale  E_h = sum of s^2 over the row's visible keys (per example, head, row; causal), or with causal_block
              = 1 over the visible logits of every real row j <= i (the head's causal block, prefill; in decoding
              the row, as the official code whose block is then one row). Official (compat):
              E_h over the whole [T, written keys] block before the mask, future and padding included, one factor
              per (example, head). factor = clip(sqrt(target_scale * mean_heads(E) / (E + 1e-8)), lo, hi); the mean
              is over all heads of the layer, the mask only says which heads get multiplied.
  rebalance   image-key logits *= image_gain (g), system-key logits *= system_gain (d).
  lens        visible image-key logits += alpha * mean over all heads of |image-key logit| (after qk_rescale and
              rebalance, as in the official code, where it runs after the mask: equal on visible keys).
pattern site (post-softmax weights A):
  adhh        text mass m = sum of A over text keys; if m >= threshold, text weights := 0 (no renormalisation).
              Per example by default; batch_sum = 1 sums m over the batch like the official trigger.
  realloc     if text mass > tau_text: image weights *= visual_factor (lambda), text weights *= text_factor
              (gamma); with renormalize = 1 the row is divided by its new sum over visible keys.
  projection  variance-constrained projection with shrinkage beta. Default: row by row, every edited row stays a
              distribution over its visible keys (self-weight zero-trace, mass-restoring rescale, shrinkage
              towards uniform; single-key rows untouched). official_compat: the official whole-matrix formula,
              future leak and padding rows included. See `_projection` for both semantics.
An op's `official_compat` leaf is None unless the config asks for the official formulas: the official branches
are then not traced at all (they would double the AIR graph's compile time for nothing).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models.segments import IMAGE, PAD, SYSTEM, TEXT
from models.spec import AttnContext, RectificationSpec

EPS = 1e-8  # the official code's epsilon for energy ratios


def _prefix_sum(x: jax.Array) -> jax.Array:
  """Inclusive prefix sum over the query axis (axis 2 of [B, H, T, K]) as one triangular matmul: on XLA:CPU a
  cumsum lowers to a blocked scan of several kernels, each compiled (one kernel here)."""
  t = x.shape[2]
  tri = jnp.tril(jnp.ones((t, t), x.dtype))
  return jnp.einsum("ts,bhsk->bhtk", tri, x, precision=jax.lax.Precision.HIGHEST)


def _row_sums(*xs: jax.Array) -> tuple[jax.Array, ...]:
  """Sums over the key axis (keepdims) of several same-shaped arrays as one variadic reduction: XLA:CPU gives
  each separate reduction its own kernel, and the per-layer CPU layout compiles every kernel once per layer."""
  zeros = tuple(jnp.zeros((), x.dtype) for x in xs)
  sums = jax.lax.reduce(xs, zeros, lambda a, b: tuple(u + v for u, v in zip(a, b)), (xs[0].ndim - 1,))
  return tuple(s[..., None] for s in sums)


def _on(flag: jax.Array) -> jax.Array:
  """0/1 float leaf -> bool (robust to values like 0.9999 after a cast)."""
  return flag > 0.5


def _rows(op, ctx: AttnContext, include_pad: bool = False) -> jax.Array:
  """[B, T] bool: the query rows the op edits (real rows, or all rows with include_pad, by the op's row rule)."""
  qseg = ctx.query_segments
  last = ctx.last_row[None, :]
  real = jnp.ones_like(qseg, bool) if include_pad else qseg != PAD
  return real & (~_on(op.last_row_only) | last) & (~_on(op.text_rows_only) | (qseg == TEXT))


def _edited(op, ctx: AttnContext) -> jax.Array:
  """[B, H, T, 1] bool: (head, row) pairs the op may change."""
  return _on(op.heads)[None, :, None, None] & _rows(op, ctx)[:, None, :, None]


def _written(ctx: AttnContext) -> jax.Array:
  """[S] bool: key slots that hold a key (the official code has no unwritten cache slots)."""
  return jnp.arange(ctx.mask.shape[-1]) <= ctx.query_slot[-1]


def _key_seg(ctx: AttnContext) -> jax.Array:
  return ctx.key_segments[:, None, None, :]  # [B, 1, 1, S]


def _qk_rescale(scores: jax.Array, op, ctx: AttnContext) -> jax.Array:
  sq = jnp.square(scores)
  row_energy = jnp.sum(jnp.where(ctx.mask[:, None], sq, 0.0), axis=-1, keepdims=True)  # [B, H, T, 1]
  if op.causal_block is not None and ctx.prefill:  # energy of the visible logits of the real rows j <= i
    real = (ctx.query_segments != PAD)[:, None, :, None]
    prefix = jnp.cumsum(jnp.where(real, row_energy, 0.0), axis=2)
    row_energy = jnp.where(_on(op.causal_block), prefix, row_energy)
  energy = row_energy
  if op.official_compat is not None:  # traced only when the spec carries the switch (compile time)
    block_energy = jnp.sum(jnp.where(_written(ctx), sq, 0.0), axis=(-2, -1), keepdims=True)  # [B, H, 1, 1]
    energy = jnp.where(_on(op.official_compat), block_energy, row_energy)
  target = op.target_scale * jnp.mean(energy, axis=1, keepdims=True)
  factor = jnp.clip(jnp.sqrt(target / (energy + EPS)), op.clamp_lo, op.clamp_hi)
  return jnp.where(_edited(op, ctx), scores * factor, scores)


def _rebalance(scores: jax.Array, op, ctx: AttnContext) -> jax.Array:
  seg = _key_seg(ctx)
  gain = jnp.where(seg == IMAGE, op.image_gain, jnp.where(seg == SYSTEM, op.system_gain, 1.0))
  return jnp.where(_edited(op, ctx), scores * gain, scores)


def _lens(scores: jax.Array, op, ctx: AttnContext) -> jax.Array:
  image = (_key_seg(ctx) == IMAGE) & ctx.mask[:, None]
  lens = jnp.mean(jnp.abs(scores), axis=1, keepdims=True)  # [B, 1, T, S], over all heads
  return jnp.where(_edited(op, ctx) & image, scores + op.alpha * lens, scores)


def _adhh(pattern: jax.Array, op, ctx: AttnContext) -> jax.Array:
  text = _key_seg(ctx) == TEXT
  mass = jnp.sum(jnp.where(text, pattern, 0.0), axis=-1, keepdims=True)  # [B, H, T, 1]
  mass = jnp.where(_on(op.batch_sum), jnp.sum(mass, axis=0, keepdims=True), mass)
  fire = mass >= op.threshold
  return jnp.where(_edited(op, ctx) & fire & text, 0.0, pattern)


def _realloc(pattern: jax.Array, op, ctx: AttnContext) -> jax.Array:
  seg = _key_seg(ctx)
  text = seg == TEXT
  scaled = pattern * jnp.where(seg == IMAGE, op.visual_factor, jnp.where(text, op.text_factor, 1.0))
  mass, total = _row_sums(jnp.where(text, pattern, 0.0), jnp.where(ctx.mask[:, None], scaled, 0.0))
  renorm = _on(op.renormalize) & (total > 0)
  scaled = jnp.where(renorm, scaled / jnp.where(renorm, total, 1.0), scaled)
  return jnp.where(_edited(op, ctx) & (mass > op.tau_text), scaled, pattern)


def _energy_tilde(pattern, visible, diag, real, self_w, c) -> jax.Array:
  """The energy reading of steps (b)-(c) (`energy_rescale` = 1): row i is the last row of the official zero-trace
  and Frobenius rescale of the causal block truncated after it: A_hat_i = A_i - c_i e_slot(i) (c_i the block's
  trace / L, not clipped), times sqrt(||block||_F^2 / ||block_hat||_F^2). Not a distribution."""
  d = jnp.where(real, self_w, 0.0)
  off = jnp.where(real, jnp.sum(jnp.where(visible & ~diag, jnp.square(pattern), 0.0), -1, keepdims=True), 0.0)
  off = jnp.cumsum(off, axis=2)
  energy = off + jnp.cumsum(jnp.square(d), axis=2)
  # ||block_hat||^2 = off-diagonal energy + sum_j (d_j - c_i)^2 = off + sum d_j^2 - n c_i^2; written as a sum of
  # squared deviations from a running mean (parallel Welford), stable when early rows attend mostly to themselves.
  count = jnp.broadcast_to(real, d.shape).astype(d.dtype)

  def combine(a, b):
    na, ma, qa = a
    nb, mb, qb = b
    n = na + nb
    w = jnp.where(n > 0, nb / jnp.maximum(n, 1.0), 0.0)
    delta = mb - ma
    return n, ma + delta * w, qa + qb + jnp.square(delta) * na * w

  _, _, dev = jax.lax.associative_scan(combine, (count, d, jnp.zeros_like(d)), axis=2)
  return (pattern - jnp.where(diag & visible, c, 0.0)) * jnp.sqrt(energy / (off + dev + EPS))


def _projection(pattern: jax.Array, op, ctx: AttnContext) -> jax.Array:
  """Variance-constrained projection of the rows the op edits.

  Default (causal, `official_compat` = 0): a map of each edited row onto itself that keeps it a distribution.
  Row i of head h, with visible keys V_i (n_i of them), weights a (mass m = sum over V_i of a, 1 for a softmax
  row; less only if an earlier op such as AD-HH removed weight without renormalising):
    n_i = 1: the row is left as it is.
    (b) zero-trace, prefill only: c_i = mean of the diagonal weights a_jj over the real rows j <= i (the trace
        over L of the causal block truncated after row i); the self weight loses d_i = min(c_i, a_ii):
        a' = a - d_i e_{slot(i)}  (never negative).
    (c) rescale, prefill only: a'' = a' * m / sum(a'), which restores the row's mass (for a probability row the
        mass is the invariant; its Frobenius energy cannot be kept together with a unit sum). A row whose whole
        mass was its self weight (sum(a') = 0) skips (b)-(c).
    (d) shrinkage towards the row's mean over its visible keys, m / n_i (uniform for a distribution):
        a* = (1 - beta) a'' + beta m / n_i on V_i; masked keys stay 0.
  So a* >= 0, sum(a*) = m, and the variance of the row over V_i is (1 - beta)^2 that of a''. In decoding (T = 1)
  steps (b)-(c) are skipped, as in the official code (no square matrix). Nothing reads a later row or key.
  `energy_rescale` = 1 reads (b)-(c) as the official formula on the truncated causal block instead (the diagonal
  loses c_i unclipped, the row is scaled to keep that block's Frobenius energy: see `_energy_tilde`); rows are then
  no longer distributions.

  Official code (`official_compat` = 1, exact): per example and head, on the whole [T, written keys] matrix A,
  masked entries included. In prefill: A_hat = A - tr(A)/L on the diagonal (key slot ctx.query_slot[i] of row i,
  every row, L = number of keys), A_tilde = A_hat * sqrt(||A||_F^2 / (||A_hat||_F^2 + eps)) with both norms over
  the whole matrix; always: A* = (1 - beta) A_tilde + beta * mean(A_tilde), the mean over all T x L entries, added
  to every entry. The mean lands on masked (future and padding) positions: in prefill earlier tokens attend to
  later ones (a future leak), padding keys reach real rows, and the statistics read future rows too. Left-padding
  rows count as uniform over the written keys (what eager attention gives them) and are projected like any
  other row when the row rule selects them ("all"), as the official code does. Rows need not sum to one and
  diagonal weights can be negative.
  """
  visible = ctx.mask[:, None]  # [B, 1, T, S]
  diag = jnp.arange(pattern.shape[-1])[None, :] == ctx.query_slot[:, None]  # [T, S]
  beta = op.beta

  # Default: row-wise, distribution-preserving. sum(tilde) = m is written out (one reduction less to compile).
  count = jnp.sum(visible, axis=-1, keepdims=True)  # [B, 1, T, 1]
  tilde = pattern
  if ctx.prefill:
    real = (ctx.query_segments != PAD)[:, None, :, None]  # [B, 1, T, 1]
    mass, self_w = _row_sums(jnp.where(visible, pattern, 0.0), jnp.where(diag, pattern, 0.0))  # [B, H, T, 1]
    sums = _prefix_sum(jnp.concatenate([jnp.where(real, self_w, 0.0),
                                        jnp.broadcast_to(real, self_w.shape).astype(pattern.dtype)], axis=-1))
    c = sums[..., :1] / jnp.maximum(sums[..., 1:], 1.0)  # mean diagonal weight of the real rows j <= i
    on_diag = diag & visible
    d = jnp.where(jnp.any(on_diag, axis=-1, keepdims=True), jnp.minimum(c, self_w), 0.0)  # [B, H, T, 1]
    hat = pattern - jnp.where(on_diag, d, 0.0)
    rest = jnp.sum(jnp.where(visible, hat, 0.0), axis=-1, keepdims=True)  # not mass - d: that cancels
    ok = rest > 0
    tilde = jnp.where(ok, hat * (mass / jnp.where(ok, rest, 1.0)), pattern)
    if op.energy_rescale is not None:
      tilde = jnp.where(_on(op.energy_rescale), _energy_tilde(pattern, visible, diag, real, self_w, c), tilde)
      row_mean = jnp.sum(jnp.where(visible, tilde, 0.0), axis=-1, keepdims=True) / jnp.maximum(count, 1)
    else:
      row_mean = mass / jnp.maximum(count, 1)  # tilde keeps the row's mass m
  else:
    mass = jnp.sum(jnp.where(visible, pattern, 0.0), axis=-1, keepdims=True)  # [B, H, T, 1]
    row_mean = mass / jnp.maximum(count, 1)
  shrunk = (1.0 - beta) * tilde + beta * row_mean
  causal = jnp.where(visible & (count > 1), shrunk, pattern)
  causal = jnp.where(_edited(op, ctx), causal, pattern)
  if op.official_compat is None:  # the official branch is not traced at all (compile time)
    return causal

  # Official: whole-matrix statistics over written key slots, masked entries included. Rows without any visible
  # key (left padding) enter as uniform over the written keys, as eager attention with an additive mask gives
  # them, whatever the cache size.
  t = pattern.shape[2]
  written = _written(ctx)
  n_keys = jnp.sum(written).astype(pattern.dtype)
  keyless = ~jnp.any(ctx.mask, axis=-1)[:, None, :, None]
  pattern_o = jnp.where(keyless, written / n_keys, pattern)
  if ctx.prefill:
    trace = jnp.sum(jnp.where(diag, pattern_o, 0.0), axis=(-2, -1), keepdims=True)  # [B, H, 1, 1]
    hat_o = pattern_o - jnp.where(diag, trace / n_keys, 0.0)
    fro = jnp.sum(jnp.where(written, jnp.square(pattern_o), 0.0), axis=(-2, -1), keepdims=True)
    fro_hat = jnp.sum(jnp.where(written, jnp.square(hat_o), 0.0), axis=(-2, -1), keepdims=True)
    tilde_o = hat_o * jnp.sqrt(fro / (fro_hat + EPS))
  else:
    tilde_o = pattern_o
  mean_o = jnp.sum(jnp.where(written, tilde_o, 0.0), axis=(-2, -1), keepdims=True) / (t * n_keys)
  official = jnp.where(written, (1.0 - beta) * tilde_o + beta * mean_o, pattern_o)

  edited_o = _on(op.heads)[None, :, None, None] & _rows(op, ctx, include_pad=True)[:, None, :, None]
  return jnp.where(_on(op.official_compat), jnp.where(edited_o, official, pattern), causal)


def edit_scores(scores: jax.Array, spec_l: RectificationSpec | None, ctx: AttnContext) -> jax.Array:
  """qk_rescale -> rebalance -> lens on the pre-mask logits."""
  ops = None if spec_l is None else spec_l.ops
  if ops is None:
    return scores
  if ops.qk_rescale is not None:
    scores = _qk_rescale(scores, ops.qk_rescale, ctx)
  if ops.rebalance is not None:
    scores = _rebalance(scores, ops.rebalance, ctx)
  if ops.lens is not None:
    scores = _lens(scores, ops.lens, ctx)
  return scores


def edit_pattern(pattern: jax.Array, spec_l: RectificationSpec | None, ctx: AttnContext) -> jax.Array:
  """adhh -> realloc -> projection on the post-softmax weights."""
  ops = None if spec_l is None else spec_l.ops
  if ops is None:
    return pattern
  if ops.adhh is not None:
    pattern = _adhh(pattern, ops.adhh, ctx)
  if ops.realloc is not None:
    pattern = _realloc(pattern, ops.realloc, ctx)
  if ops.projection is not None:
    pattern = _projection(pattern, ops.projection, ctx)
  return pattern


def edit_z(z: jax.Array, spec_l: RectificationSpec | None, ctx: AttnContext) -> jax.Array:
  """head_gate: multiply head h's output by gate[h] (1.0 is an exact no-op)."""
  del ctx
  if spec_l is None:
    return z
  return z * spec_l.head_gate.astype(z.dtype)[None, None, :, None]
