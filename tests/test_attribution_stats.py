"""S_h / E_h on hand-computed numbers, streaming merges, rankings, heads selection and the heatmap PNG."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from air_jax.attribution_stats import HeadStats, merge_moments, moments, rank_heads, select_heads, summary_arrays
from air_jax.heatmap import colors, render, save_heatmap


def _values(cols):
  """[n, 1, 2] from per-head columns."""
  return np.stack([np.asarray(c, float) for c in cols], axis=-1)[:, None, :]


def test_s_and_e_hand_computed():
  st = HeadStats.zeros(1, 2)
  # head 0: H = 1, 2, 3 (mean 2, var 1); N = 0, 2 (mean 1, var 2) -> S = 1, E = 1 / sqrt(3)
  # head 1: H = 4, 4, 4 (var 0); N = 1, 3 (mean 2, var 2)          -> S = 2, E = 2 / sqrt(2)
  st.update("H", _values([[1, 2, 3], [4, 4, 4]]))
  st.update("N", _values([[0, 2], [1, 3]]))
  np.testing.assert_allclose(st.s_score(), [[1.0, 2.0]])
  np.testing.assert_allclose(st.e_score(), [[1 / np.sqrt(3), 2 / np.sqrt(2)]])
  np.testing.assert_allclose(st.var(), [[[1.0, 0.0]], [[2.0, 2.0]]])
  arrays = summary_arrays(st)
  assert arrays["count_H"].tolist() == [[3, 3]] and arrays["count_N"].tolist() == [[2, 2]]
  np.testing.assert_allclose(arrays["mean_N"], [[1.0, 2.0]])


def test_undefined_scores_are_nan():
  st = HeadStats.zeros(1, 2)
  st.update("H", _values([[1.0], [2.0]]))
  assert np.isnan(st.s_score()).all()  # N empty
  st.update("N", _values([[0.5], [0.5]]))
  np.testing.assert_allclose(st.s_score(), [[0.5, 1.5]])
  assert np.isnan(st.e_score()).all()  # one sample per set: no unbiased variance
  with pytest.raises(ValueError, match="shape"):
    st.update("H", np.zeros((2, 3, 2)))
  with pytest.raises(ValueError, match="set"):
    st.update("X", np.zeros((1, 1, 2)))


def test_chunked_and_merged_equal_one_pass():
  rng = np.random.default_rng(0)
  h = rng.normal(0.3, 1.0, (37, 3, 4)) * 1e-2 + 5.0  # a large offset tests the numerical stability
  n = rng.normal(-0.1, 2.0, (23, 3, 4)) * 1e-2 + 5.0
  one = HeadStats.zeros(3, 4)
  one.update("H", h)
  one.update("N", n)
  streamed = HeadStats.zeros(3, 4)
  for part in np.array_split(h, 5):
    streamed.update("H", part)
  for part in np.array_split(n, 7):
    streamed.update("N", part)
  a, b = HeadStats.zeros(3, 4), HeadStats.zeros(3, 4)
  a.update("H", h[:10]); a.update("N", n[:20])
  b.update("H", h[10:]); b.update("N", n[20:])
  merged = a.merge(b)
  for st in (streamed, merged):
    np.testing.assert_allclose(st.count, one.count)
    np.testing.assert_allclose(st.mean, one.mean, rtol=1e-12)
    np.testing.assert_allclose(st.m2, one.m2, rtol=1e-9)
    np.testing.assert_allclose(st.e_score(), one.e_score(), rtol=1e-9)
  # against numpy directly
  np.testing.assert_allclose(one.var()[0], h.var(axis=0, ddof=1), rtol=1e-9)
  np.testing.assert_allclose(one.s_score(), h.mean(0) - n.mean(0), rtol=1e-9)
  empty = moments(np.zeros((0, 2)))
  np.testing.assert_allclose(merge_moments(empty, moments(np.ones((3, 2))))[1], [1.0, 1.0])
  roundtrip = HeadStats.from_arrays(one.to_arrays("p/"), "p/")
  np.testing.assert_array_equal(roundtrip.m2, one.m2)


def test_rankings_and_selection():
  s = np.array([[0.5, -0.2, np.nan],
                [0.9, 0.01, -0.7]])
  assert rank_heads(s, 2) == [[1, 0], [0, 0]]
  assert rank_heads(s, 2, largest=False) == [[1, 2], [0, 1]]
  assert rank_heads(s, 10) == [[1, 0], [0, 0], [1, 1], [0, 1], [1, 2]]  # NaN never selected
  sel = select_heads(s, 2)
  assert sel == {"hal_heads": [[1, 0], [0, 0]], "non_hal_heads": [[1, 2], [0, 1]]}
  assert select_heads(s, 2, non_hal="abs")["non_hal_heads"] == [[1, 1], [0, 1]]
  assert rank_heads(np.zeros((2, 2)), 3) == [[0, 0], [0, 1], [1, 0]]  # ties: layer-major order
  # Fewer than 2k scored heads (a --screen subset): the lists stay disjoint, the non-hal one shorter.
  few = np.full((2, 3), np.nan)
  few[0, 0], few[1, 1], few[1, 2] = 0.3, -0.1, 0.2
  assert select_heads(few, 2) == {"hal_heads": [[0, 0], [1, 2]], "non_hal_heads": [[1, 1]]}
  assert select_heads(few, 2, non_hal="abs")["non_hal_heads"] == [[1, 1]]
  with pytest.raises(ValueError, match="non_hal"):
    select_heads(s, 2, non_hal="smallest")


def test_heatmap(tmp_path):
  v = np.array([[1.0, -1.0, 0.0], [np.nan, 0.5, -0.25]])
  rgb = colors(v, limit=1.0)
  assert tuple(rgb[0, 0]) == (180, 4, 38) and tuple(rgb[0, 1]) == (59, 76, 192)
  assert tuple(rgb[0, 2]) == (247, 247, 247) and tuple(rgb[1, 0]) == (200, 200, 200)
  img, (x0, y0) = render(v, "E", cell=10, hal_heads=[[1, 1]], limit=1.0)
  assert img.getpixel((x0 + 5, y0 + 5)) == (180, 4, 38)  # centre of cell [0, 0]
  assert img.getpixel((x0 + 10 * 1 + 5, y0 + 5)) == (59, 76, 192)
  assert img.getpixel((x0 + 10, y0 + 10)) == (0, 0, 0)  # outline of the selected head [1, 1]
  path = tmp_path / "h.png"
  save_heatmap(path, v, "title")
  with Image.open(path) as im:
    assert im.format == "PNG" and im.size[0] > 30
  with pytest.raises(ValueError, match="layers, heads"):
    render(np.zeros(3))
