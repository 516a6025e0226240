"""MAI (modality-wise) and TAI (token-wise) attention imbalance.

Shape legend: B captions, N generation steps, L layers, H heads, R generating rows, S keys.

MAI of a head at a step = attention mass of the generating row on text keys / mass on image keys (segments from
the input ids, `models.segments`), read from `Generation.segment_mass` [B, N, L, H, 3] (system, image, text).

TAI of a key token j = its attention share / its information share, both averaged over the generating rows r
that see j and over the layers and heads asked for:
  attention share   a_rj (the post-softmax weight);
  information share c_rj = a_rj n_j / sum_k a_rk n_k, with n_j = ||W_O^h v_j^h|| the norm of what key j writes
                    into the residual stream through head h per unit of attention: c_rj is key j's share of the
                    norm of the head's output, the attention-weighted value norms of Kobayashi et al. (2020);
  TAI_j = sum_r,l,h a_rj / sum_r,l,h c_rj.
Per row, a_rj / c_rj = (sum_k a_rk n_k) / n_j: a token has high TAI when what it contributes is small compared
with what the head reads on average, i.e. it draws attention without bringing information (attention sinks such
as the BOS or newline token). Because that ratio does not depend on how much attention the token itself draws,
`high_tai_tokens` only considers tokens that draw at least their uniform share of attention. `info="uniform"`
uses c_rj = 1 / (number of keys row r sees) instead (then TAI_j = attention share x T, the fallback of the note).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

IMAGE, TEXT = 1, 2  # models.segments order: system, image, text
EPS = 1e-9


def mai(segment_mass: np.ndarray, num_tokens: np.ndarray | None = None) -> np.ndarray:
  """[B, N, L, H] text mass / image mass per caption, step, layer and head; NaN after the caption's end."""
  m = np.asarray(segment_mass, np.float64)
  out = m[..., TEXT] / np.maximum(m[..., IMAGE], EPS)
  if num_tokens is not None:
    steps = np.arange(m.shape[1])[None, :] < np.asarray(num_tokens)[:, None]
    out = np.where(steps[:, :, None, None], out, np.nan)
  return out


def head_mask(heads: Iterable[Sequence[int]], num_layers: int, num_heads: int) -> np.ndarray:
  """[L, H] bool, True at the listed (layer, head) pairs."""
  mask = np.zeros((num_layers, num_heads), bool)
  for layer, head in heads:
    mask[int(layer), int(head)] = True
  return mask


def pooled_mai(segment_mass: np.ndarray, num_tokens: np.ndarray | None = None,
               heads: np.ndarray | None = None) -> np.ndarray:
  """MAI of pooled masses: sum over captions of text mass / sum of image mass, per step [N] and head [L, H]
  (or per step [N] over the heads of the [L, H] mask `heads`); NaN at steps no caption reaches and, like
  `mai_summary`, NaN everywhere for an empty `heads` mask. Robust where single rows put almost nothing on the
  image."""
  m = np.asarray(segment_mass, np.float64)
  steps = np.ones(m.shape[:2], bool)
  if num_tokens is not None:
    steps = np.arange(m.shape[1])[None, :] < np.asarray(num_tokens)[:, None]
  m = m * steps[:, :, None, None, None]
  text, image = m[..., TEXT].sum(0), m[..., IMAGE].sum(0)  # [N, L, H]
  if heads is not None:
    heads = np.asarray(heads, bool)
    text, image = text[:, heads].sum(-1), image[:, heads].sum(-1)
    # No heads means no mass at all: 0 / EPS would read as "no text attention", so NaN.
    alive = steps.any(0) & heads.any()
  else:
    alive = steps.any(0)[:, None, None]
  return np.where(alive, text / np.maximum(image, EPS), np.nan)


def mai_summary(mai_values: np.ndarray, sensitive: np.ndarray, segment_mass: np.ndarray | None = None,
                num_tokens: np.ndarray | None = None, insensitive: np.ndarray | None = None) -> dict[str, float]:
  """Median of the per-(caption, step, head) MAI of the sensitive heads [L, H] vs the others (and, given the
  [L, H] mask `insensitive`, vs those heads: the paper compares sensitive ~5.1 with insensitive ~1.5); with the
  masses also the ratio of the summed text and image masses ("pooled", the robust average). An empty group gives
  NaN."""
  out = {}
  groups = [("sensitive", sensitive), ("other", ~sensitive)]
  if insensitive is not None:
    groups.append(("insensitive", np.asarray(insensitive, bool)))
  for name, sel in groups:
    v = mai_values[..., sel]
    v = v[np.isfinite(v)]
    out[f"{name}_median"] = float(np.median(v)) if v.size else float("nan")
    if segment_mass is not None and not sel.any():
      out[f"{name}_pooled"] = float("nan")
    elif segment_mass is not None:
      m = np.asarray(segment_mass, np.float64)
      if num_tokens is not None:
        m = m * (np.arange(m.shape[1])[None, :] < np.asarray(num_tokens)[:, None])[:, :, None, None, None]
      m = m[..., sel, :]
      out[f"{name}_pooled"] = float(m[..., TEXT].sum() / max(m[..., IMAGE].sum(), EPS))
  return out


def tai(attn: np.ndarray, rows: np.ndarray, value_norms: np.ndarray | None = None,
        valid: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """TAI of every key of one sequence.

  Args:
    attn: [L, H, S, S] attention of a teacher-forced pass (or any [..., S, S]; leading axes are averaged).
    rows: [R] int, the generating rows to average over.
    value_norms: [L, H, S] n_j per head (`model_io.layer_inputs`); None for info="uniform".
    valid: [R, S] keys each row sees (default: causal, key <= row).

  Returns:
    {"tai" [S] (NaN for keys no row sees), "attention_share" [S], "information_share" [S],
     "uniform_share" [S] (mean of 1 / visible keys over the rows that see the key)}.
  """
  a = np.asarray(attn, np.float64)[..., rows, :]  # [..., R, S]
  s = a.shape[-1]
  if valid is None:
    valid = np.arange(s)[None, :] <= np.asarray(rows)[:, None]
  a = np.where(valid, a, 0.0)
  lead = a.shape[:-2]
  if value_norms is None:
    c = np.broadcast_to(valid / valid.sum(-1, keepdims=True), a.shape)
  else:
    n = np.asarray(value_norms, np.float64).reshape(lead + (1, s))
    w = a * n
    c = w / np.maximum(w.sum(-1, keepdims=True), EPS)
  seen = valid.any(0)
  axes = tuple(range(a.ndim - 1))
  a_share, c_share = a.mean(axis=axes), c.mean(axis=axes)
  n_rows = np.maximum(valid.sum(0), 1)
  uniform = np.where(valid, 1.0 / valid.sum(-1, keepdims=True), 0.0).sum(0) / n_rows
  with np.errstate(divide="ignore", invalid="ignore"):
    t = np.where(seen & (c_share > 0), a_share / c_share, np.nan)
  # attention/information shares are means over all R rows; rescale to the rows that see the key
  scale = valid.shape[0] / n_rows
  return {"tai": t, "attention_share": a_share * scale, "information_share": c_share * scale,
          "uniform_share": uniform}


def high_tai_tokens(tai_values: np.ndarray, attention_share: np.ndarray, uniform_share: np.ndarray,
                    candidates: np.ndarray, threshold: float | None = None, top_k: int | None = None) -> np.ndarray:
  """Positions among `candidates` that draw at least their uniform attention share and have TAI >= threshold
  (when given), sorted by TAI (highest first), at most top_k of them (when given)."""
  cand = np.asarray(candidates)
  t = tai_values[cand]
  keep = np.isfinite(t) & (attention_share[cand] >= uniform_share[cand])
  if threshold is not None:
    keep &= t >= threshold
  order = np.argsort(-t[keep], kind="stable")
  return cand[keep][order][:top_k]


def distance_to_next(positions: Iterable[int], targets: Iterable[int]) -> list[int | None]:
  """For each position, (next target strictly after it) - position, or None when no target follows."""
  tg = np.sort(np.asarray(list(targets), np.int64))
  out: list[int | None] = []
  for p in positions:
    k = np.searchsorted(tg, p, side="right")
    out.append(int(tg[k] - p) if k < tg.size else None)
  return out


def within_fraction(distances: Sequence[int | None], window: int = 15) -> float:
  """Share of distances that exist and are <= window (NaN for no distances)."""
  if not distances:
    return float("nan")
  return float(np.mean([d is not None and d <= window for d in distances]))


__all__ = ["distance_to_next", "head_mask", "high_tai_tokens", "mai", "mai_summary", "pooled_mai", "tai",
           "within_fraction"]
