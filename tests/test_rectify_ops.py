"""Each AIR op of models.rectify against a plain-NumPy implementation of its formula (written from the notes).

Random logits on contexts with left padding, causal masks, unwritten cache slots and several segment layouts
(system + image + text, padded, two image runs, no image), in prefill (T rows) and in a decoding step (T = 1).
"""

from __future__ import annotations

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from models import rectify
from models.llava import prompt_context
from models.segments import IMAGE, PAD, SYSTEM, TEXT
from models.spec import (AIROps, ADHHOp, AttnContext, LensOp, ProjectionOp, QKRescaleOp, ReallocOp, RebalanceOp,
                         RectificationSpec)

IMG = 99
H, T, S = 4, 7, 9  # S > T: two unwritten cache slots in prefill
HEADS = np.array([1.0, 0.0, 1.0, 1.0])
NEG = np.finfo(np.float32).min
EPS = 1e-8


def _prefill_ctx() -> AttnContext:
  ids = np.array([[1, 2, IMG, IMG, IMG, 3, 4],     # system, image, text
                  [0, 0, 1, IMG, IMG, 3, 4],       # left padding
                  [1, IMG, 3, IMG, 4, 5, 6],       # two image runs
                  [1, 2, 3, 4, 5, 6, 7]])          # no image: all text
  mask = np.ones_like(ids)
  mask[1, :2] = 0
  return prompt_context(jnp.asarray(ids), jnp.asarray(mask), IMG, key_slots=S)


def _decode_ctx() -> AttnContext:
  seg = np.array(_prefill_ctx().key_segments)
  seg[:, T] = TEXT  # the row being generated, written at slot T; slot T + 1 is unwritten
  visible = (seg != PAD) & (np.arange(S) <= T)[None]
  return AttnContext(key_segments=jnp.asarray(seg), query_segments=jnp.full((4, 1), TEXT, jnp.int32),
                     mask=jnp.asarray(visible[:, None, :]), query_slot=jnp.array([T]), prefill=False)


CTXS = {"prefill": _prefill_ctx, "decode": _decode_ctx}


def _scores(ctx, seed=0):
  rng = np.random.default_rng(seed)
  b, t, s = ctx.mask.shape
  return (rng.normal(size=(b, H, t, s)) * 2.0).astype(np.float32)


def _pattern(ctx, seed=0, scale=1.0):
  """Softmax with the model's mask convention (fully masked rows are uniform over the written keys)."""
  unwritten = np.arange(ctx.mask.shape[-1]) > int(np.asarray(ctx.query_slot)[-1])
  x = np.where(np.asarray(ctx.mask)[:, None], _scores(ctx, seed) * scale, np.where(unwritten, -np.inf, NEG))
  x = np.exp(x - x.max(-1, keepdims=True))
  return (x / x.sum(-1, keepdims=True)).astype(np.float32)


def _rows_np(ctx, rows: str, include_pad: bool = False) -> np.ndarray:
  qseg = np.asarray(ctx.query_segments)
  sel = np.ones(qseg.shape, bool) if include_pad else qseg != PAD
  if rows == "last":
    sel = sel & (np.arange(qseg.shape[1]) == qseg.shape[1] - 1)[None]
  if rows == "text":
    sel = sel & (qseg == TEXT)
  return sel


def _rule(rows: str) -> dict:
  return dict(last_row_only=jnp.float32(rows == "last"), text_rows_only=jnp.float32(rows == "text"))


def _spec(**ops) -> RectificationSpec:
  return RectificationSpec(head_gate=jnp.ones(H), ops=AIROps(**ops))


def _check(got, want):
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-6)


# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("phase", ["prefill", "decode"])
@pytest.mark.parametrize("rows", ["all", "last", "text"])
@pytest.mark.parametrize("compat", [0, 1])
def test_qk_rescale(phase, rows, compat):
  ctx = CTXS[phase]()
  s = _scores(ctx)
  lo, hi, scale = 0.9, 1.1, 1.2
  op = QKRescaleOp(heads=jnp.asarray(HEADS), clamp_lo=jnp.float32(lo), clamp_hi=jnp.float32(hi),
                   target_scale=jnp.float32(scale), official_compat=jnp.float32(compat), **_rule(rows))
  got = rectify.edit_scores(jnp.asarray(s), _spec(qk_rescale=op), ctx)
  mask, sel = np.asarray(ctx.mask), _rows_np(ctx, rows)
  n_written = int(np.asarray(ctx.query_slot)[-1]) + 1
  want = s.copy()
  for b in range(s.shape[0]):
    for i in range(s.shape[2]):
      if not sel[b, i]:
        continue
      if compat:  # whole pre-mask block over written slots
        energy = (s[b, :, :, :n_written].astype(np.float64) ** 2).sum(axis=(1, 2))
      else:
        energy = np.array([(s[b, h, i, mask[b, i]].astype(np.float64) ** 2).sum() for h in range(H)])
      factor = np.clip(np.sqrt(scale * energy.mean() / (energy + EPS)), lo, hi)
      for h in range(H):
        if HEADS[h]:
          want[b, h, i] = s[b, h, i] * factor[h]
  assert not np.allclose(want, s)
  _check(got, want)


@pytest.mark.parametrize("phase", ["prefill", "decode"])
@pytest.mark.parametrize("rows", ["text", "all"])
def test_rebalance(phase, rows):
  ctx = CTXS[phase]()
  s = _scores(ctx, 1)
  op = RebalanceOp(heads=jnp.asarray(HEADS), image_gain=jnp.float32(1.3), system_gain=jnp.float32(0.6), **_rule(rows))
  got = rectify.edit_scores(jnp.asarray(s), _spec(rebalance=op), ctx)
  seg, sel = np.asarray(ctx.key_segments), _rows_np(ctx, rows)
  want = s.copy()
  for b in range(s.shape[0]):
    for h in range(H):
      for i in range(s.shape[2]):
        if HEADS[h] and sel[b, i]:
          for k in range(s.shape[3]):
            want[b, h, i, k] *= 1.3 if seg[b, k] == IMAGE else (0.6 if seg[b, k] == SYSTEM else 1.0)
  _check(got, want)
  if phase == "prefill" and rows == "text":  # rows before the image end are untouched
    np.testing.assert_array_equal(np.asarray(got)[0, :, :5], s[0, :, :5])


@pytest.mark.parametrize("phase", ["prefill", "decode"])
@pytest.mark.parametrize("rows", ["last", "all"])
def test_lens(phase, rows):
  ctx = CTXS[phase]()
  s = _scores(ctx, 2)
  op = LensOp(heads=jnp.asarray(HEADS), alpha=jnp.float32(0.28), **_rule(rows))
  got = rectify.edit_scores(jnp.asarray(s), _spec(lens=op), ctx)
  seg, mask, sel = np.asarray(ctx.key_segments), np.asarray(ctx.mask), _rows_np(ctx, rows)
  want = s.copy()
  for b in range(s.shape[0]):
    for i in range(s.shape[2]):
      for k in range(s.shape[3]):
        if sel[b, i] and seg[b, k] == IMAGE and mask[b, i, k]:
          boost = np.abs(s[b, :, i, k]).mean()  # over all heads
          for h in range(H):
            if HEADS[h]:
              want[b, h, i, k] = s[b, h, i, k] + 0.28 * boost
  assert not np.allclose(want, s)
  _check(got, want)


@pytest.mark.parametrize("phase", ["prefill", "decode"])
@pytest.mark.parametrize("batch_sum", [0, 1])
def test_adhh(phase, batch_sum):
  ctx = CTXS[phase]()
  p = _pattern(ctx, 3)
  seg = np.asarray(ctx.key_segments)
  text = seg[:, None, None, :] == TEXT
  last_mass = (p * text).sum(-1)[:, :, -1]  # [B, H]
  threshold = float(np.median(last_mass.sum(0) if batch_sum else last_mass))
  op = ADHHOp(heads=jnp.asarray(HEADS), threshold=jnp.float32(threshold), batch_sum=jnp.float32(batch_sum),
              **_rule("last"))
  got = rectify.edit_pattern(jnp.asarray(p), _spec(adhh=op), ctx)
  want = p.copy()
  fired = 0
  for h in range(H):
    for b in range(p.shape[0]):
      i = p.shape[2] - 1
      mass = sum(p[bb, h, i, seg[bb] == TEXT].sum() for bb in range(p.shape[0])) if batch_sum else \
          p[b, h, i, seg[b] == TEXT].sum()
      if HEADS[h] and mass >= threshold:
        want[b, h, i, seg[b] == TEXT] = 0.0
        fired += 1
  assert 0 < fired < HEADS.sum() * p.shape[0]  # the trigger both fires and does not
  _check(got, want)


def test_adhh_per_example_is_batch_independent():
  """Per example, one row's result does not depend on the other examples (the official trigger does)."""
  ctx = _decode_ctx()
  p = _pattern(ctx, 4)
  op = lambda bs: ADHHOp(heads=jnp.ones(H), threshold=jnp.float32(0.5), batch_sum=jnp.float32(bs), **_rule("last"))
  sub = AttnContext(key_segments=ctx.key_segments[:1], query_segments=ctx.query_segments[:1], mask=ctx.mask[:1],
                    query_slot=ctx.query_slot, prefill=False)
  full = rectify.edit_pattern(jnp.asarray(p), _spec(adhh=op(0)), ctx)
  one = rectify.edit_pattern(jnp.asarray(p[:1]), _spec(adhh=op(0)), sub)
  np.testing.assert_array_equal(np.asarray(full)[:1], np.asarray(one))
  full_c = rectify.edit_pattern(jnp.asarray(p), _spec(adhh=op(1)), ctx)
  one_c = rectify.edit_pattern(jnp.asarray(p[:1]), _spec(adhh=op(1)), sub)
  assert not np.array_equal(np.asarray(full_c)[:1], np.asarray(one_c))


@pytest.mark.parametrize("phase", ["prefill", "decode"])
@pytest.mark.parametrize("renorm", [0, 1])
def test_realloc(phase, renorm):
  ctx = CTXS[phase]()
  p = _pattern(ctx, 5)
  seg, mask, sel = np.asarray(ctx.key_segments), np.asarray(ctx.mask), _rows_np(ctx, "all")
  tau = float(np.median((p * (seg[:, None, None, :] == TEXT)).sum(-1)[sel[:, None, :].repeat(H, 1)]))
  op = ReallocOp(heads=jnp.asarray(HEADS), tau_text=jnp.float32(tau), visual_factor=jnp.float32(3.5),
                 text_factor=jnp.float32(0.1), renormalize=jnp.float32(renorm), **_rule("all"))
  got = rectify.edit_pattern(jnp.asarray(p), _spec(realloc=op), ctx)
  want = p.copy()
  fired = 0
  for b in range(p.shape[0]):
    for h in range(H):
      for i in range(p.shape[2]):
        row = p[b, h, i]
        if not (HEADS[h] and sel[b, i] and row[seg[b] == TEXT].sum() > tau):
          continue
        fired += 1
        new = row.astype(np.float64)
        new[seg[b] == IMAGE] *= 3.5
        new[seg[b] == TEXT] *= 0.1
        if renorm:
          new = new / new[mask[b, i]].sum()
        want[b, h, i] = new
  assert fired > 0
  _check(got, want)
  if renorm:  # edited rows are distributions again
    np.testing.assert_allclose(np.asarray(got).sum(-1)[np.asarray(ctx.mask).any(-1)[:, None].repeat(H, 1)], 1.0,
                               rtol=1e-5)


def _project_rows_default(p, ctx, sel, beta):
  """Default: each edited row stays a distribution (self-weight zero-trace, mass rescale, shrinkage to uniform)."""
  mask, qseg = np.asarray(ctx.mask), np.asarray(ctx.query_segments)
  slots = np.asarray(ctx.query_slot)
  want = p.astype(np.float64).copy()
  for b in range(p.shape[0]):
    for h in range(H):
      if not HEADS[h]:
        continue
      for i in range(p.shape[2]):
        vis = mask[b, i]
        if not sel[b, i] or vis.sum() < 2:
          continue
        row = p[b, h, i].astype(np.float64)
        m = row[vis].sum()
        if ctx.prefill:
          real = [j for j in range(i + 1) if qseg[b, j] != PAD]
          c = np.mean([p[b, h, j, slots[j]] for j in real])  # trace / L of the truncated causal block
          hat = row.copy()
          hat[slots[i]] -= min(c, row[slots[i]])
          if hat[vis].sum() > 0:
            row = hat * m / hat[vis].sum()
        want[b, h, i, vis] = (1 - beta) * row[vis] + beta * m / vis.sum()
  return want


def _project_official(p, ctx, sel, beta):
  """The official code: whole [T, written] matrix per head, mean added to every entry (masked ones too)."""
  n = int(np.asarray(ctx.query_slot)[-1]) + 1
  mask = np.asarray(ctx.mask)
  want = p.astype(np.float64).copy()
  for b in range(p.shape[0]):
    for h in range(H):
      a = p[b, h, :, :n].astype(np.float64)
      keyless = ~mask[b, :, :n].any(-1)
      a[keyless] = 1.0 / n  # key-less (padding) rows: uniform over the written keys, as eager attention gives them
      if ctx.prefill:
        a_hat = a - np.eye(n) * np.trace(a) / n
        a = a_hat * np.sqrt((a ** 2).sum() / ((a_hat ** 2).sum() + EPS))
      star = (1 - beta) * a + beta * a.mean()
      for i in range(p.shape[2]):
        if HEADS[h] and sel[b, i]:
          want[b, h, i, :n] = star[i]
  return want


@pytest.mark.parametrize("phase", ["prefill", "decode"])
@pytest.mark.parametrize("rows", ["all", "last"])
@pytest.mark.parametrize("compat", [0, 1])
def test_projection(phase, rows, compat):
  ctx = CTXS[phase]()
  p = _pattern(ctx, 6)
  beta = 0.3
  op = ProjectionOp(heads=jnp.asarray(HEADS), beta=jnp.float32(beta), official_compat=jnp.float32(compat),
                    **_rule(rows))
  got = rectify.edit_pattern(jnp.asarray(p), _spec(projection=op), ctx)
  sel = _rows_np(ctx, rows, include_pad=bool(compat))  # the official code projects padding rows too
  want = (_project_official if compat else _project_rows_default)(p, ctx, sel, beta)
  assert not np.allclose(want, p)
  _check(got, want)


def test_projection_future_leak_only_in_official_compat():
  ctx = _prefill_ctx()
  p = _pattern(ctx, 7)
  future = ~np.asarray(ctx.mask)[:, None] & (np.arange(S) < T)[None, None, None, :]  # written but not visible
  future &= np.asarray(ctx.mask).any(-1)[:, None, :, None]  # real rows only
  out = {}
  for compat in (0, 1):
    op = ProjectionOp(heads=jnp.ones(H), beta=jnp.float32(0.1), official_compat=jnp.float32(compat),
                      **_rule("all"))
    out[compat] = np.asarray(rectify.edit_pattern(jnp.asarray(p), _spec(projection=op), ctx))
  future = np.broadcast_to(future, out[0].shape)
  assert np.all(out[0][future] == 0.0)
  assert np.all(out[1][future] > 0.0)  # earlier tokens attend to later ones


def _proj_spec(beta, compat=0, rows="all", heads=None):
  op = ProjectionOp(heads=jnp.ones(H) if heads is None else jnp.asarray(heads), beta=jnp.float32(beta),
                    official_compat=jnp.float32(compat), **_rule(rows))
  return _spec(projection=op)


@pytest.mark.parametrize("phase", ["prefill", "decode"])
@pytest.mark.parametrize("seed,scale", [(11, 1.0), (12, 4.0), (13, 12.0)])  # up to near one-hot rows
def test_default_projection_keeps_distributions(phase, seed, scale):
  """Every edited row: non-negative, sums to one over its visible keys, zero on masked keys, variance shrunk."""
  ctx = CTXS[phase]()
  p = _pattern(ctx, seed, scale)
  mask = np.broadcast_to(np.asarray(ctx.mask)[:, None], p.shape)
  real = np.broadcast_to((np.asarray(ctx.query_segments) != PAD)[:, None, :], p.shape[:3])
  for beta in (0.0, 0.3, 0.9):
    got = np.asarray(rectify.edit_pattern(jnp.asarray(p), _proj_spec(beta), ctx))
    assert np.all(got[mask] >= 0.0)
    assert np.all(got[~mask] == p[~mask])
    np.testing.assert_allclose(got.sum(-1)[real], 1.0, rtol=0, atol=2e-6)
    if phase == "decode":  # shrinkage alone: variance over the visible keys times (1 - beta)^2
      var = lambda a: np.array([[a[b, h, 0, mask[b, h, 0]].var() for h in range(H)] for b in range(p.shape[0])])
      np.testing.assert_allclose(var(got), (1 - beta) ** 2 * var(p), rtol=1e-4, atol=1e-9)
  # the failure mode: no row becomes all-zero or negative (first real rows of the old default did)
  assert np.abs(got.sum(-1)[real] - 1).max() < 1e-5


def test_default_projection_leaves_single_key_rows_unchanged():
  ctx = _prefill_ctx()
  p = _pattern(ctx, 14)
  got = np.asarray(rectify.edit_pattern(jnp.asarray(p), _proj_spec(0.5), ctx))
  single = np.asarray(ctx.mask).sum(-1) == 1  # [B, T]: the first real row of each example
  assert single.sum() == p.shape[0]
  np.testing.assert_array_equal(got.transpose(0, 2, 1, 3)[single], p.transpose(0, 2, 1, 3)[single])
  assert not np.allclose(got.transpose(0, 2, 1, 3)[~single], p.transpose(0, 2, 1, 3)[~single])


@pytest.mark.parametrize("compat", [0, 1])
def test_projection_reads_no_later_row(compat):
  """Perturbing rows after i (and their keys) changes no row <= i in default mode; the official code does."""
  ctx = _prefill_ctx()
  p = _pattern(ctx, 15)
  q = _pattern(ctx, 16)
  cut = 4
  mixed = p.copy()
  mixed[:, :, cut + 1:] = q[:, :, cut + 1:]
  a = np.asarray(rectify.edit_pattern(jnp.asarray(p), _proj_spec(0.3, compat), ctx))
  b = np.asarray(rectify.edit_pattern(jnp.asarray(mixed), _proj_spec(0.3, compat), ctx))
  if compat:
    assert np.abs(a[:, :, : cut + 1] - b[:, :, : cut + 1]).max() > 1e-4
  else:
    np.testing.assert_array_equal(a[:, :, : cut + 1], b[:, :, : cut + 1])


def test_official_projection_edits_padding_rows():
  """official_compat: a left-padding row is uniform over the written keys and then projected like any other."""
  ctx = _prefill_ctx()
  p = _pattern(ctx, 17)
  n = T
  np.testing.assert_allclose(p[1, :, 0, :n], 1.0 / n, rtol=1e-6)  # the model gives it uniform over written keys
  assert np.all(p[1, :, 0, n:] == 0.0)
  got = np.asarray(rectify.edit_pattern(jnp.asarray(p), _proj_spec(0.3, 1), ctx))
  assert not np.allclose(got[1, :, 0], p[1, :, 0])
  default = np.asarray(rectify.edit_pattern(jnp.asarray(p), _proj_spec(0.3, 0), ctx))
  np.testing.assert_array_equal(default[1, :, :2], p[1, :, :2])  # default: padding rows are not edited


def test_neutral_is_bit_identical():
  """ops=None and compiled-in ops with all-zero head masks return their inputs bit for bit."""
  for ctx in (_prefill_ctx(), _decode_ctx()):
    s, p = jnp.asarray(_scores(ctx, 9)), jnp.asarray(_pattern(ctx, 9))
    z = jnp.asarray(np.random.default_rng(0).normal(size=(s.shape[0], s.shape[2], H, 5)).astype(np.float32))
    off = jnp.zeros(H)
    one = jnp.float32(1.0)
    rule = _rule("all")
    full = _spec(
        qk_rescale=QKRescaleOp(heads=off, clamp_lo=one * 0.5, clamp_hi=one * 2, target_scale=one,
                               official_compat=one, **rule),
        rebalance=RebalanceOp(heads=off, image_gain=one * 2, system_gain=one * 0.5, **rule),
        lens=LensOp(heads=off, alpha=one, **rule),
        adhh=ADHHOp(heads=off, threshold=one * 0.0, batch_sum=one, **rule),
        realloc=ReallocOp(heads=off, tau_text=one * 0, visual_factor=one * 3, text_factor=one * 0.1,
                          renormalize=one, **rule),
        projection=ProjectionOp(heads=off, beta=one * 0.5, official_compat=one * 0, **rule))
    neutral = RectificationSpec(head_gate=jnp.ones(H))
    for spec in (None, neutral, full):
      assert np.array_equal(np.asarray(rectify.edit_scores(s, spec, ctx)), np.asarray(s))
      assert np.array_equal(np.asarray(rectify.edit_pattern(p, spec, ctx)), np.asarray(p))
      assert np.array_equal(np.asarray(rectify.edit_z(z, spec, ctx)), np.asarray(z))


def test_ops_jit_and_vmap_over_values():
  """Values are traced leaves: one compiled function serves every beta; vmap over betas equals a loop."""
  ctx = _prefill_ctx()
  p = jnp.asarray(_pattern(ctx, 10))
  betas = jnp.array([0.0, 0.1, 0.3, 0.9])

  def run(beta):
    op = ProjectionOp(heads=jnp.ones(H), beta=beta, official_compat=jnp.float32(0), **_rule("all"))
    return rectify.edit_pattern(p, _spec(projection=op), ctx)

  batched = jax.jit(jax.vmap(run))(betas)
  for k, beta in enumerate(betas):
    np.testing.assert_allclose(np.asarray(batched[k]), np.asarray(run(beta)), rtol=1e-5, atol=2e-7)
