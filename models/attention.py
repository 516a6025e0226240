"""Grouped-query causal self-attention with intervention sites.

Shape legend:
  B batch, T query rows of this chunk, S key slots (the chunk itself, or the whole KV cache),
  H query heads, K key/value heads (G = H // K query heads share one), D query/key head dim, Dv value head dim
  (equal to D except in multi-head latent attention, see models.mla).
Sites (see models.rectify): `scores` [B, H, T, S] and `pattern` [B, H, T, S] in float32, `z` [B, T, H, D].
Query head h reads key/value head h // G (transformers' `repeat_kv` order).

Key/value layouts (`kv_layout`): "bskd" k [B, S, K, D], v [B, S, K, Dv] (a chunk, or a stacked cache), and
"heads_major" k [B*K, D, S], v [B*K, Dv, S] (the per-layer KV cache, see models.llama.init_cache). The second is
what XLA:CPU's batched matrix-vector kernels read in place: with "bskd" every decoding step copies (transposes)
the whole cache twice per layer, which dominated decoding at long prompts (LLaVA-NeXT's 1300+ image tokens).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models import rectify
from models.segments import NAMES
from models.spec import AttnContext, RectificationSpec

NEG = jnp.finfo(jnp.float32).min  # the additive mask value transformers uses in float32


def _extra_ops(spec_l, site: str, x: jax.Array, ctx: AttnContext) -> jax.Array:
  """Method-contributed ops (`spec_l.extra`) at one site, in order; an op without that site is skipped.

  Sites: `edit_scores` (pre-mask logits, like rectify.edit_scores), `edit_masked` (logits after the mask, where
  masked entries hold NEG: an op may give them a finite value, e.g. attention registers) and `edit_pattern`
  (probabilities after softmax and the AIR pattern ops).
  """
  for op in getattr(spec_l, "extra", None) or ():
    fn = getattr(op, site, None)
    if fn is not None:
      x = fn(x, ctx)
  return x


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    ctx: AttnContext,
    spec_l: RectificationSpec | None,
    *,
    want_pattern: bool = False,
    want_stats: bool = False,
    own: tuple | None = None,
    scale: float | None = None,
    kv_layout: str = "bskd",
) -> tuple[jax.Array, dict]:
  """q [B, T, H, D], k [B, S, K, D], v [B, S, K, Dv] -> z [B, T, H, Dv] (after the `z` site) and extras.

  scale: the logit scale (default D ** -0.5).
  kv_layout: "bskd", or "heads_major" for k [B*K, D, S], v [B*K, Dv, S] (see the module docstring); the
  result is the same.

  own: optional (k_own, v_own [B, 1, K, D], slot []) for a read-only cache: the single query row's own key and
  value stand at `slot` instead of whatever k/v hold there, exactly as if they had been written to it. k/v can
  then stay shared (e.g. unbatched under `jax.vmap`), which avoids one cache copy per vmapped item.

  extras: `pattern` [B, H, T, S] when want_pattern; `segment_mass` [B, H, 3] (attention of the last query
  row on system / image / text keys, after interventions) when want_stats.
  """
  b, t, h, d = q.shape
  if kv_layout == "bskd":
    kv, dv = k.shape[2], v.shape[-1]
  elif kv_layout == "heads_major":
    kv, dv = k.shape[0] // b, v.shape[1]
  else:
    raise ValueError(f"kv_layout must be 'bskd' or 'heads_major', got {kv_layout!r}")
  g = h // kv
  scale = d**-0.5 if scale is None else scale
  qg = q.reshape(b, t, kv, g, d)
  if kv_layout == "bskd":
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k)
  else:  # rows m = (g, t) of each (b, k) pair against its [D, S] key block
    qn = qg.transpose(0, 2, 3, 1, 4).reshape(b * kv, g * t, d)
    scores = jnp.einsum("nmd,nds->nms", qn, k).reshape(b, kv, g, t, -1)
  scores = scores * jnp.asarray(scale, q.dtype)
  scores = scores.reshape(b, h, t, -1).astype(jnp.float32)
  if own is not None:
    k_own, v_own, slot = own
    own_score = jnp.einsum("btkgd,btkd->bkgt", qg, k_own) * jnp.asarray(scale, q.dtype)
    at_slot = jnp.arange(scores.shape[-1]) == slot  # [S]
    scores = jnp.where(at_slot, own_score.reshape(b, h, t, 1).astype(jnp.float32), scores)
  scores = rectify.edit_scores(scores, spec_l, ctx)
  scores = _extra_ops(spec_l, "edit_scores", scores, ctx)
  # Unwritten cache slots get -inf, masked written keys NEG: a row with no visible key (left padding) is then
  # uniform over the written keys, as in transformers' eager attention, whatever the cache size. Real rows are
  # unaffected (exp(NEG - max) is already 0).
  unwritten = jnp.arange(scores.shape[-1]) > ctx.query_slot[-1]
  scores = jnp.where(ctx.mask[:, None], scores, jnp.where(unwritten, -jnp.inf, NEG))
  scores = _extra_ops(spec_l, "edit_masked", scores, ctx)
  pattern = jax.nn.softmax(scores, axis=-1)
  pattern = rectify.edit_pattern(pattern, spec_l, ctx)
  pattern = _extra_ops(spec_l, "edit_pattern", pattern, ctx)
  p5 = pattern.astype(v.dtype).reshape(b, kv, g, t, -1)

  def values(p):  # p [B, K, G, T, S] -> [B, T, K, G, Dv]
    if kv_layout == "bskd":
      return jnp.einsum("bkgts,bskd->btkgd", p, v)
    zn = jnp.einsum("nms,nds->nmd", p.reshape(b * kv, g * t, -1), v)
    return zn.reshape(b, kv, g, t, dv).transpose(0, 3, 1, 2, 4)

  if own is None:
    z = values(p5).reshape(b, t, h, dv)
  else:
    z = values(jnp.where(at_slot, 0.0, p5))
    z = (z + jnp.einsum("bkgt,btkd->btkgd", p5[..., slot], v_own)).reshape(b, t, h, dv)
  z = rectify.edit_z(z, spec_l, ctx)
  extras = {}
  if want_pattern:
    extras["pattern"] = pattern
  if want_stats:
    last = pattern[:, :, -1, :]  # [B, H, S]
    seg = ctx.key_segments[:, None, :]
    extras["segment_mass"] = jnp.stack([jnp.where(seg == i, last, 0.0).sum(-1) for i in range(len(NAMES))], -1)
  return z, extras
