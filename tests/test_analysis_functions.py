"""air_jax.analysis pure functions: B.1 closed form vs Monte Carlo, B.2, MAI/TAI, A.2 cosine, cost reader, figures."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from air_jax.analysis import attention_stats as bs
from air_jax.analysis import figures, imbalance, propagation as pr, similarity
from air_jax.analysis.cost import read_methods_json

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "methods_bench.json")


def _random_w(rng, e, scale, shift):
  a = rng.standard_normal((e, e)) * scale
  return a + a.T * 0.3 + np.eye(e) * shift  # asymmetric on purpose: the functions symmetrise


# --- B.1 ------------------------------------------------------------------------------------------------


def test_closed_form_matches_monte_carlo_over_random_w():
  """Stated tolerance, T = 128, 3000 walks (standard error <= 0.009 per point), eight random W from the uniform to
  the localized regime (|xi| up to 2.8): the corrected eq. (7) and the finite-T eq. (2) within a mean |error| of
  0.06 (measured 0.011-0.047; the Gaussian approximation of the quadratic form loosens as |xi| grows) and a
  max |error| of 0.15; the printed eq. (7) is worse on every W (measured 0.07-0.25)."""
  rng = np.random.default_rng(1)
  e, t = 8, 128
  theta = np.arange(1, t + 1) / t
  for scale, shift in ((0.15, 0.4), (0.1, -0.3), (0.3, 0.0), (0.05, 0.6), (0.2, -0.1), (0.1, 0.5), (0.3, 0.3),
                       (0.5, 0.1)):
    w = _random_w(rng, e, scale, shift)
    sp = pr.spectrum(w, e)
    mc = pr.rho_monte_carlo(w, t, e, num_draws=3000, seed=5)
    corr = np.abs(pr.rho_closed_form(theta, sp.tr_w, sp.tr_w2, e) - mc)
    fin = np.abs(pr.rho_finite(t, sp.tr_w, sp.tr_w2, e) - mc)
    paper = np.abs(pr.rho_closed_form(theta, sp.tr_w, sp.tr_w2, e, "paper") - mc)
    assert corr.mean() < 0.06 and corr.max() < 0.15, (scale, shift, corr.mean(), corr.max())
    assert fin.mean() < 0.06 and fin.max() < 0.15, (scale, shift, fin.mean(), fin.max())
    assert paper.mean() > corr.mean() + 0.03, (scale, shift, paper.mean(), corr.mean())


def test_factored_spectrum_and_monte_carlo_equal_the_matrix_forms():
  rng = np.random.default_rng(4)
  a, b = rng.standard_normal((2, 3, 2, 6)) * 0.4  # [heads, D, E]
  w = np.einsum("hde,hdf->hef", a, b)
  c = rng.standard_normal((6, 6))
  sigma = c @ c.T / 6 + np.eye(6)
  for sig in (None, sigma):
    full, fac = pr.spectrum(w, 2, sig), pr.spectrum_from_factors(a, b, 2, sig)
    np.testing.assert_allclose(fac.tr_w, full.tr_w, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(fac.tr_w2, full.tr_w2, rtol=1e-10, atol=1e-12)
  mc_full = pr.rho_monte_carlo(w[0], 16, 2, num_draws=400, seed=1)
  mc_fac = pr.rho_monte_carlo((a[0], b[0]), 16, 2, num_draws=400, seed=1)
  np.testing.assert_allclose(mc_fac, mc_full, atol=1e-2)  # same walks; only boundary ties may differ
  table = pr.head_table(pr.spectrum_from_factors(a, b, 2), num_theta=5)
  assert table["rho"].shape == (3, 5)


def test_spectrum_statistics_and_head_table():
  w = np.diag([1.0, 2.0, 3.0])
  sp = pr.spectrum(w, 4)
  assert sp.tr_w == pytest.approx(6.0) and sp.tr_w2 == pytest.approx(14.0)
  assert sp.xi == pytest.approx(6 / np.sqrt(14)) and sp.eta == pytest.approx(np.sqrt(14 / 4))
  assert sp.theta_star == pytest.approx(0.5 + 2 / 12)
  assert np.isnan(pr.spectrum(np.diag([0.1, 0.0, 0.0]), 4).theta_star)  # peak outside (0, 1): uniform regime
  sigma = np.diag([2.0, 1.0, 1.0])
  assert pr.spectrum(w, 4, sigma).tr_w == pytest.approx(7.0)
  table = pr.head_table(np.stack([w, -w])[None], 4, num_theta=11)
  assert table["rho"].shape == (1, 2, 11) and table["tr_w"].shape == (1, 2)
  assert np.all((table["rho"] >= 0) & (table["rho"] <= 1))
  with pytest.raises(ValueError, match="variant"):
    pr.variance_coefficient(0.5, "other")


def test_step_covariance_recovers_the_random_walk_sigma():
  """Assumption 1: x_1 ~ N(0, Sigma), x_{t+1} ~ N(x_t, Sigma). Sigma is the step covariance: the estimator from
  consecutive differences recovers it (25k steps: standard error ~1 %), the covariance of the states themselves is
  ~T/2 times too large, and the streaming per-layer accumulator eval.analyze uses agrees with the batch form."""
  rng = np.random.default_rng(0)
  n, t, e = 400, 64, 4
  sigma = np.diag([1.0, 0.5, 0.25, 2.0])
  walks = np.cumsum(rng.standard_normal((n, t, e)) @ np.linalg.cholesky(sigma).T, axis=1)  # [N, T, E]
  est = pr.step_covariance(walks)
  np.testing.assert_allclose(np.diag(est), np.diag(sigma), rtol=0.05)
  assert np.abs(est - np.diag(np.diag(est))).max() < 0.03
  assert (np.diag(pr.state_covariance(walks)) / np.diag(sigma)).min() > 5  # not Sigma: grows with t
  # Padded copies: steps touching a masked token are left out, and steps never cross sequences.
  padded = np.concatenate([walks, np.full((n, 3, e), 50.0)], axis=1)
  mask = np.arange(t + 3)[None] < t
  np.testing.assert_allclose(pr.step_covariance(padded, np.broadcast_to(mask, (n, t + 3))), est, rtol=1e-10)
  acc = pr.StepCovariance()
  for k in range(n):  # one sequence at a time, two "layers" (the second scaled by 2)
    acc.update(np.stack([walks[k], 2 * walks[k]]))
  np.testing.assert_allclose(acc.covariance(), np.stack([est, 4 * est]), rtol=1e-8, atol=1e-12)
  assert pr.StepCovariance().covariance() is None
  with pytest.raises(ValueError, match="at least 2 steps"):
    pr.step_covariance(walks[0, :2])


# --- B.2 ------------------------------------------------------------------------------------------------


def test_variance_and_entropy_on_hand_made_rows():
  t = 4
  uniform = np.full(t, 1 / t)
  onehot = np.eye(t)[0]
  assert bs.row_variance(uniform) == pytest.approx(0.0)
  assert bs.row_entropy(uniform) == pytest.approx(np.log(t))
  assert bs.row_variance(onehot) == pytest.approx(((1 - 1 / t) ** 2 + (t - 1) / t**2) / t)
  assert bs.row_entropy(onehot) == pytest.approx(0.0)
  # a causal row over 2 of 4 keys is measured on its support: uniform there means variance 0, entropy log 2
  row = np.array([0.5, 0.5, 0.0, 0.0])
  valid = np.array([True, True, False, False])
  assert bs.row_variance(row, valid) == pytest.approx(0.0)
  assert bs.row_entropy(row, valid) == pytest.approx(np.log(2))
  # sharpening a distribution raises the variance and lowers the entropy: negative correlation
  logits = np.arange(6.0)
  rows = np.stack([np.exp(k * logits) / np.exp(k * logits).sum() for k in np.linspace(0, 3, 12)])
  c = bs.variance_entropy_correlation(bs.row_variance(rows), bs.row_entropy(rows))
  assert c["spearman"] == pytest.approx(-1.0) and c["pearson"] < -0.9 and c["n"] == 12
  attn = np.arange(25.0).reshape(5, 5)
  got, valid = bs.generating_rows(attn, 3)
  assert np.array_equal(got, attn[2:4]) and np.array_equal(valid, np.tril(np.ones((5, 5), bool))[2:4])


# --- MAI / TAI --------------------------------------------------------------------------------------------


def test_mai_on_hand_made_masses():
  m = np.zeros((2, 3, 1, 2, 3))  # [B, N, L, H, (system, image, text)]
  m[..., 1], m[..., 2] = 0.2, 0.6
  m[1, :, 0, 1, 1], m[1, :, 0, 1, 2] = 0.6, 0.3
  v = imbalance.mai(m, num_tokens=np.array([3, 2]))
  assert v[0, 0, 0, 0] == pytest.approx(3.0) and v[1, 0, 0, 1] == pytest.approx(0.5)
  assert np.isnan(v[1, 2]).all() and np.isfinite(v[0, 2]).all()
  sens = np.array([[True, False]])
  s = imbalance.mai_summary(v, sens, m, np.array([3, 2]))
  assert s["sensitive_median"] == pytest.approx(3.0)
  # head 1: 3 steps at 0.6/0.2 and 2 steps at 0.3/0.6 pooled
  assert s["other_pooled"] == pytest.approx((3 * 0.6 + 2 * 0.3) / (3 * 0.2 + 2 * 0.6))
  # The insensitive heads as their own group (the paper's comparison); an empty group is NaN, not 0.
  s2 = imbalance.mai_summary(v, sens, m, np.array([3, 2]), insensitive=~sens)
  assert s2["insensitive_pooled"] == s["other_pooled"] and s2["insensitive_median"] == s["other_median"]
  none = imbalance.mai_summary(v, np.zeros_like(sens), m, np.array([3, 2]))
  assert np.isnan(none["sensitive_pooled"]) and np.isnan(none["sensitive_median"])
  pooled = imbalance.pooled_mai(m, np.array([3, 2]), heads=~sens)
  assert pooled[2] == pytest.approx(3.0) and pooled[0] == pytest.approx(0.9 / 0.8)
  # No heads selected: NaN at every step (as mai_summary), not a ratio of 0 over nothing.
  assert np.isnan(imbalance.pooled_mai(m, np.array([3, 2]), heads=np.zeros_like(sens))).all()


def test_tai_on_hand_made_attention():
  # 3 keys, generating rows 1 and 2; row 1 sees keys 0-1, row 2 keys 0-2.
  attn = np.zeros((3, 3))
  attn[1, :2] = [0.5, 0.5]
  attn[2] = [0.6, 0.2, 0.2]
  norms = np.array([1.0, 3.0, 1.0])
  out = imbalance.tai(attn[None, None], np.array([1, 2]), norms[None, None])
  # row 1: contributions 0.5*1, 0.5*3 -> shares 0.25, 0.75; row 2: 0.6, 0.6, 0.2 -> 0.6/1.4, 0.6/1.4, 0.2/1.4
  c0, c1, c2 = (0.25 + 0.6 / 1.4) / 2, (0.75 + 0.6 / 1.4) / 2, (0.2 / 1.4)
  assert out["tai"][0] == pytest.approx(((0.5 + 0.6) / 2) / c0)
  assert out["tai"][1] == pytest.approx(((0.5 + 0.2) / 2) / c1)
  assert out["tai"][2] == pytest.approx(0.2 / c2)
  assert out["uniform_share"][2] == pytest.approx(1 / 3) and out["uniform_share"][0] == pytest.approx((1 / 2 + 1 / 3) / 2)
  uni = imbalance.tai(attn[None, None], np.array([1, 2]))
  assert uni["tai"][0] == pytest.approx(((0.5 + 0.6) / 2) / ((1 / 2 + 1 / 3) / 2))
  high = imbalance.high_tai_tokens(out["tai"], out["attention_share"], out["uniform_share"], np.arange(3))
  assert list(high) == [0]  # keys 1 and 2 draw less than their uniform share
  assert list(imbalance.high_tai_tokens(uni["tai"], uni["attention_share"], uni["uniform_share"], np.arange(3),
                                        threshold=10.0)) == []


def test_distance_to_next_hallucination():
  d = imbalance.distance_to_next([2, 5, 9, 12], [4, 10])
  assert d == [2, 5, 1, None]
  assert imbalance.within_fraction(d, 2) == pytest.approx(0.5)
  assert np.isnan(imbalance.within_fraction([]))


# --- A.2 --------------------------------------------------------------------------------------------------


def test_cosine_similarity_and_group_means():
  rng = np.random.default_rng(0)
  a = rng.random((2, 3, 7, 7))
  assert np.allclose(similarity.cosine(a, a), 1.0)
  assert np.allclose(similarity.head_similarity(a, a * 5, 4), 1.0)  # scale-free
  b = np.zeros((7, 7))
  b[0, 0] = 1
  c = np.zeros((7, 7))
  c[1, 1] = 1
  assert similarity.cosine(b, c) == 0.0
  u = similarity.uniform_causal_block(3, 5)
  assert np.allclose(u[-1], 1 / 5) and u[0, 0] == pytest.approx(1 / 3) and u[0, 1] == 0.0
  sim = np.array([[1.0, 0.5], [0.2, 0.4]])
  g = similarity.group_means(sim[None], [(0, 0), (1, 1)], [(1, 0)])
  assert g["S_hal"] == pytest.approx(0.7) and g["S_non"] == pytest.approx(0.2)
  assert np.isnan(similarity.group_means(sim, [], [])["S_hal"])
  with pytest.raises(ValueError, match="num_output"):
    similarity.output_block(a, 9)
  with pytest.raises(ValueError, match="layers, heads"):
    similarity.head_similarity(a, a[:1], 3)


# --- C.3 and figures ------------------------------------------------------------------------------------


def test_methods_json_reader(tmp_path):
  data = read_methods_json(FIXTURE)
  assert data["model"] == "tiny fixture" and data["methods"]["vcd"]["paper_ratio"] is None
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps({"model": "m", "methods": {"air": {"ms_per_token": 1, "caption_s": "slow", "ratio": 1}}}))
  with pytest.raises(ValueError, match=r"methods\['air'\]\['caption_s'\]"):
    read_methods_json(bad)
  bad.write_text("{")
  with pytest.raises(ValueError, match="not valid JSON"):
    read_methods_json(bad)


def _grid(fig):
  axes = [a for a in fig.axes if a.get_label() != "<colorbar>"]
  g = axes[0].get_subplotspec().get_gridspec()
  return g.get_geometry(), len(axes)


def test_figures_have_the_expected_panels(tmp_path):
  rng = np.random.default_rng(0)
  attn = rng.random((3, 4, 10, 10))
  f = figures.attention_grid(attn, [0, 2], [1, 3], boundaries={"image": 2, "caption": 7})
  assert _grid(f) == ((2, 3), 6)
  assert f.axes[2].get_title() == "mean of heads" and f.axes[0].get_title() == "head 1"
  figures.save(f, tmp_path / "grid.png")
  assert (tmp_path / "grid.png").stat().st_size > 1000
  curves = {k: {"values": [1, 2, 3], "C_S": [30, 20, 25], "C_I": [10, 8, 9], "greedy_C_S": 35, "greedy_C_I": 12}
            for k in ("lambda", "gamma", "tau_text", "beta")}
  f = figures.sensitivity_figure(curves, defaults={"lambda": 2})
  assert _grid(f) == ((1, 4), 4) and f.axes[0].get_xlabel() == "lambda" and f.axes[0].get_ylabel() == "CHAIR (%)"
  m = rng.random((2, 5, 3, 4, 3))
  sens = np.zeros((3, 4), bool)
  sens[0, 1] = True
  f = figures.mai_figure(m, np.array([5, 3]), sens)
  assert _grid(f) == ((1, 2), 2)
  f = figures.cost_figure(read_methods_json(FIXTURE)["methods"], model="tiny")
  assert _grid(f) == ((1, 1), 1)
  assert len(f.axes[0].patches) == 4 and f.axes[0].get_xlabel() == "time per caption (s)"
  assert [t.get_text() for t in f.axes[0].get_yticklabels()] == ["greedy", "air", "adhh", "vcd"]
  # The paper's ratios as hollow diamonds at ratio x greedy seconds (vcd has none), read on the ratio axis on top.
  marks = [(ln.get_xdata()[0], ln.get_ydata()[0]) for ln in f.axes[0].lines if ln.get_marker() == "D"]
  assert marks == [(pytest.approx(1.0 * 1.02), 0), (pytest.approx(1.21 * 1.02), 1), (pytest.approx(1.14 * 1.02), 2)]
  assert all(ln.get_markerfacecolor() == "none" for ln in f.axes[0].lines)
  assert [a.get_xlabel() for a in f.axes[0].child_axes] == ["ratio to greedy"]
  f.savefig(tmp_path / "cost.png")
  assert not [ln for ln in figures.cost_figure(read_methods_json(FIXTURE)["methods"], paper=False).axes[0].lines]
  f = figures.head_heatmap(rng.standard_normal((3, 4)), title="E", label="E_h", hal_heads=[(0, 1)])
  assert len(f.axes) == 2  # the map and its colour bar
  f = figures.rho_figure(np.linspace(0, 1, 5), {"a": np.ones(5) / 2}, mc={"mc": (np.array([0.5]), np.array([0.4]))})
  assert len(f.axes) == 1 and len(f.axes[0].lines) == 2
  f = figures.variance_entropy_figure(rng.random((3, 4)), rng.random((3, 4)), sens)
  assert len(f.axes) == 1
  import matplotlib.pyplot as plt

  plt.close("all")
