"""Streaming per-head statistics of Delta P over sets H and N, S_h and E_h (AIR, A.1), rankings and top-k.

  S_h = mean_H(Delta P_h) - mean_N(Delta P_h)
  E_h = S_h / sqrt(var_H + var_N)         (unbiased sample variances, ddof = 1; NaN where undefined)

Counts, means and M2 (sum of squared deviations) are kept per set and head in float64 and merged with Chan et
al.'s parallel update, so any split of the data into chunks, samples or runs gives the one-pass result.

Rankings. The official AD-HH tool ranks by S_h: `hal_heads` = the k largest S_h, `non_hal_heads` = the k
smallest S_h (`torch.topk(difference, k, largest=False)`: the most negative, i.e. removing the head lowers the
probability of correct object tokens more than that of hallucinated ones). The paper ranks by E_h; we apply the
same rule to E_h. `non_hal="abs"` instead picks the k heads with the smallest |score| (the heads whose removal
changes little), another reading of the paper's text.
"""

from __future__ import annotations

import dataclasses

import numpy as np

SETS = ("H", "N")


def moments(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(count, mean, M2) over the leading axis of values [n, ...] (count broadcast to the trailing shape)."""
  x = np.asarray(values, np.float64)
  n = np.full(x.shape[1:], x.shape[0], np.float64)
  if x.shape[0] == 0:
    return n, np.zeros(x.shape[1:]), np.zeros(x.shape[1:])
  mean = x.mean(axis=0)
  return n, mean, ((x - mean) ** 2).sum(axis=0)


def merge_moments(a, b):
  """Chan et al.'s combination of two (count, mean, M2) triples."""
  na, ma, m2a = a
  nb, mb, m2b = b
  n = na + nb
  safe = np.where(n > 0, n, 1.0)
  delta = mb - ma
  mean = np.where(n > 0, ma + delta * nb / safe, 0.0)
  m2 = m2a + m2b + delta ** 2 * na * nb / safe
  return n, mean, m2


@dataclasses.dataclass
class HeadStats:
  """count, mean, m2: [2, L, H] float64, first axis the sets ("H", "N")."""

  count: np.ndarray
  mean: np.ndarray
  m2: np.ndarray

  @classmethod
  def zeros(cls, num_layers: int, num_heads: int) -> "HeadStats":
    """Empty statistics of every head set."""
    shape = (len(SETS), num_layers, num_heads)
    return cls(np.zeros(shape), np.zeros(shape), np.zeros(shape))

  @property
  def shape(self) -> tuple[int, int]:
    return self.count.shape[1:]

  def update(self, set_name: str, values: np.ndarray) -> None:
    """Adds values [n, L, H] (n scored tokens) to set "H" or "N"."""
    if set_name not in SETS:
      raise ValueError(f"set must be one of {SETS}, got {set_name!r}")
    values = np.asarray(values, np.float64)
    if values.ndim != 3 or values.shape[1:] != self.shape:
      raise ValueError(f"values must have shape [n, {self.shape[0]}, {self.shape[1]}], got {values.shape}")
    s = SETS.index(set_name)
    merged = merge_moments((self.count[s], self.mean[s], self.m2[s]), moments(values))
    self.count[s], self.mean[s], self.m2[s] = merged

  def merge(self, other: "HeadStats") -> "HeadStats":
    """A new HeadStats holding both operands' data."""
    if other.shape != self.shape:
      raise ValueError(f"cannot merge statistics of shapes {self.shape} and {other.shape}")
    n, m, m2 = merge_moments((self.count, self.mean, self.m2), (other.count, other.mean, other.m2))
    return HeadStats(n, m, m2)

  def var(self, ddof: int = 1) -> np.ndarray:
    """[2, L, H] variances; NaN where count <= ddof."""
    den = self.count - ddof
    with np.errstate(invalid="ignore", divide="ignore"):
      return np.where(den > 0, self.m2 / np.where(den > 0, den, 1.0), np.nan)

  def s_score(self) -> np.ndarray:
    """S_h [L, H]; NaN when a set is empty."""
    ok = (self.count[0] > 0) & (self.count[1] > 0)
    return np.where(ok, self.mean[0] - self.mean[1], np.nan)

  def e_score(self, ddof: int = 1) -> np.ndarray:
    """E_h [L, H]; NaN where a variance is undefined or both are zero."""
    v = self.var(ddof)
    den = np.sqrt(v[0] + v[1])
    s = self.s_score()
    with np.errstate(invalid="ignore", divide="ignore"):
      return np.where(den > 0, s / np.where(den > 0, den, 1.0), np.nan)

  def to_arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
    """The statistics as named arrays (for an .npz), keys prefixed."""
    return {f"{prefix}count": self.count, f"{prefix}mean": self.mean, f"{prefix}m2": self.m2}

  @classmethod
  def from_arrays(cls, arrays, prefix: str = "") -> "HeadStats":
    """Inverse of `to_arrays` (float64)."""
    return cls(*(np.array(arrays[f"{prefix}{k}"], np.float64) for k in ("count", "mean", "m2")))


def rank_heads(scores: np.ndarray, k: int, *, largest: bool = True, by_abs: bool = False) -> list[list[int]]:
  """The k [layer, head] pairs with the largest (or smallest) score, best first; NaN never selected.

  Ties keep the order of the flat index (layer-major), like a stable sort.
  """
  s = np.asarray(scores, np.float64)
  flat = np.abs(s.ravel()) if by_abs else s.ravel()
  valid = np.flatnonzero(~np.isnan(flat))
  key = -flat[valid] if largest else flat[valid]
  order = valid[np.argsort(key, kind="stable")][:max(k, 0)]
  nh = s.shape[1]
  return [[int(i // nh), int(i % nh)] for i in order]


def select_heads(scores: np.ndarray, k: int, non_hal: str = "negative") -> dict[str, list[list[int]]]:
  """Heads file content {"hal_heads", "non_hal_heads"} from a score matrix [L, H] (see the module docstring).

  The two lists are disjoint: the non-hallucination heads are ranked among the heads not already chosen as
  hallucination heads (this matters only when fewer than 2k heads have a score, e.g. a `--screen` subset; the
  lists then come out shorter than k).
  """
  if non_hal not in ("negative", "abs"):
    raise ValueError(f"non_hal must be 'negative' or 'abs', got {non_hal!r}")
  hal = rank_heads(scores, k, largest=True)
  rest = np.array(scores, np.float64)
  for layer, head in hal:
    rest[layer, head] = np.nan
  return {"hal_heads": hal, "non_hal_heads": rank_heads(rest, k, largest=False, by_abs=non_hal == "abs")}


def summary_arrays(stats: HeadStats) -> dict[str, np.ndarray]:
  """The matrices saved in the .npz: S, E, counts, means, variances per set."""
  var = stats.var()
  return {"S": stats.s_score(), "E": stats.e_score(), "count_H": stats.count[0], "count_N": stats.count[1],
          "mean_H": stats.mean[0], "mean_N": stats.mean[1], "var_H": var[0], "var_N": var[1]}
