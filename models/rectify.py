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
  qk_rescale  E_h = sum of s^2 over the row's visible keys (per example, head, row; causal). Official (compat):
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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models.segments import IMAGE, PAD, SYSTEM, TEXT
from models.spec import AttnContext, RectificationSpec

EPS = 1e-8  # the official code's epsilon for energy ratios


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
  mass = jnp.sum(jnp.where(text, pattern, 0.0), axis=-1, keepdims=True)
  scaled = pattern * jnp.where(seg == IMAGE, op.visual_factor, jnp.where(text, op.text_factor, 1.0))
  total = jnp.sum(jnp.where(ctx.mask[:, None], scaled, 0.0), axis=-1, keepdims=True)
  renorm = _on(op.renormalize) & (total > 0)
  scaled = jnp.where(renorm, scaled / jnp.where(renorm, total, 1.0), scaled)
  return jnp.where(_edited(op, ctx) & (mass > op.tau_text), scaled, pattern)


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
  compat = _on(op.official_compat)

  # Default: row-wise, distribution-preserving.
  count = jnp.sum(visible, axis=-1, keepdims=True)  # [B, 1, T, 1]
  mass = jnp.sum(jnp.where(visible, pattern, 0.0), axis=-1, keepdims=True)  # [B, H, T, 1]
  tilde = pattern
  if ctx.prefill:
    real = (ctx.query_segments != PAD)[:, None, :, None]  # [B, 1, T, 1]
    self_w = jnp.sum(jnp.where(diag, pattern, 0.0), axis=-1, keepdims=True)  # [B, H, T, 1]
    n_real = jnp.cumsum(jnp.broadcast_to(real, self_w.shape).astype(pattern.dtype), axis=2)
    c = jnp.cumsum(jnp.where(real, self_w, 0.0), axis=2) / jnp.maximum(n_real, 1.0)
    hat = pattern - jnp.where(diag & visible, jnp.minimum(c, self_w), 0.0)
    rest = jnp.sum(jnp.where(visible, hat, 0.0), axis=-1, keepdims=True)
    ok = rest > 0
    tilde = jnp.where(ok, hat * (mass / jnp.where(ok, rest, 1.0)), pattern)
  shrunk = (1.0 - beta) * tilde + beta * mass / jnp.maximum(count, 1)
  causal = jnp.where(visible & (count > 1), shrunk, pattern)

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
  return jnp.where(compat, jnp.where(edited_o, official, pattern), jnp.where(_edited(op, ctx), causal, pattern))


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
