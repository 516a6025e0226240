"""B.2: row variance sigma_A^2 and entropy H(A_i) of attention rows, and their correlation.

Shape legend: ... any leading axes (e.g. L, B, H, rows), S keys. `valid` [..., S] marks the keys a row may
attend (its causal support without padding); the row's T in sigma_A^2 = (1/T) sum_j (A_ij - 1/T)^2 is the
number of valid keys, so rows of different lengths are comparable as the seed defines them.
"""

from __future__ import annotations

import numpy as np


def row_variance(attn: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
  """sigma_A^2 of each row [...]: mean over valid keys of (A_ij - 1/T)^2, T = number of valid keys."""
  a = np.asarray(attn, np.float64)
  v = np.ones_like(a, bool) if valid is None else np.broadcast_to(np.asarray(valid, bool), a.shape)
  t = v.sum(-1)
  dev = np.where(v, a - 1.0 / np.maximum(t, 1)[..., None], 0.0)
  return (dev**2).sum(-1) / np.maximum(t, 1)


def row_entropy(attn: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
  """H(A_i) = -sum_j A_ij log A_ij in nats (0 log 0 = 0), over valid keys."""
  a = np.asarray(attn, np.float64)
  if valid is not None:
    a = np.where(np.broadcast_to(np.asarray(valid, bool), a.shape), a, 0.0)
  with np.errstate(divide="ignore", invalid="ignore"):
    terms = np.where(a > 0, a * np.log(a), 0.0)
  return -terms.sum(-1)


def variance_entropy_correlation(variance: np.ndarray, entropy: np.ndarray) -> dict[str, float]:
  """Pearson and Spearman correlation of paired variance/entropy values (the seed predicts negative)."""
  from scipy import stats  # deferred: scipy.stats is slow to import

  v, h = np.ravel(variance), np.ravel(entropy)
  ok = np.isfinite(v) & np.isfinite(h)
  v, h = v[ok], h[ok]
  if v.size < 3 or np.ptp(v) == 0 or np.ptp(h) == 0:
    return {"pearson": float("nan"), "spearman": float("nan"), "n": int(v.size)}
  return {"pearson": float(stats.pearsonr(v, h)[0]), "spearman": float(stats.spearmanr(v, h)[0]), "n": int(v.size)}


def generating_rows(attn: np.ndarray, start: int, stop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """The rows of a teacher-forced pass that generated tokens start..stop-1 and their causal validity.

  attn [..., T, T] (row r produced token r + 1). Returns rows [..., R, T] and valid [R, T] (key <= row).
  """
  t = attn.shape[-1]
  stop = t if stop is None else stop
  rows = np.arange(start - 1, stop - 1)
  valid = np.arange(t)[None, :] <= rows[:, None]
  return attn[..., rows, :], valid


__all__ = ["generating_rows", "row_entropy", "row_variance", "variance_entropy_correlation"]
