"""B.1: token propagation probability rho(theta) of a head from its query-key matrix (the seed's eq. (1)-(7)).

Shape legend: E token width, T tokens, N Monte Carlo draws, theta = i / T in (0, 1].

Setting (Assumption 1): tokens follow a Gaussian random walk x_1 ~ N(0, Sigma), x_{t+1} ~ N(x_t, Sigma); the
logits of the last token are omega_j = x_j^T W_QK x_T / sqrt(d); rho_i = P(<gamma^i, omega> + 1/T in [0, 1])
with gamma^i = e^i / T - 1 / T^2 (the linearised softmax). Sigma is the covariance of one step of the walk (not of
the states, whose covariance grows as t Sigma); `step_covariance` estimates it from consecutive token states.
With W = W_QK Sigma (W_QK symmetrised),
  mu(theta) = (theta - 1/2) tr(W) / sqrt(d)
  v(theta)  = c(theta) tr(W^2) / d
  rho(theta) = 1/2 [erf(mu / sqrt(2 v)) + erf((1 - mu) / sqrt(2 v))]        (eq. (2), the Gaussian approximation)

The seed prints c(theta) = 2 theta^2 + 7/12 (eq. (4)), hence sqrt(4 theta^2 + 7/6) in (7). Computing the
variance exactly (Isserlis: Var(a^T M b) = tr(M C_aa M C_bb) + tr(M C_ab M C_ab) with a = x_i - mean_j x_j,
b = x_T, Cov(x_j, x_k) = min(j, k) Sigma) gives c(theta) = 2 theta^2 - 2 theta + 7/12 instead: the seed drops
the -2 theta term (its variance is symmetric around theta = 1/2 only with it). `variant="corrected"` (default)
uses the exact coefficient, `variant="paper"` reproduces (7) as printed. The Monte Carlo estimate of eq. (1)
agrees with the corrected form (tests: mean |error| < 0.06, measured 0.011-0.047, over eight random W at T = 128;
the printed form: 0.07-0.25). Both closed forms drop the 1/T offset and are asymptotic in T; `rho_finite` is eq. (2)
with the exact finite-T mean and variance (the 1/T offset included), which is what matters for short sequences
or small tr(W^2) / d.

d is the dimension in the logit scale 1/sqrt(d): for a model's head, its head dim D (the tokens live in E >= D
dimensions). The peak of rho is where mu = 1/2: theta* = 1/2 + sqrt(d) / (2 tr(W)) (localized when in (0, 1)).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy.special import erf

VARIANTS = ("corrected", "paper")


def symmetrize(w_qk: np.ndarray) -> np.ndarray:
  """(W + W^T) / 2 over the last two axes."""
  w = np.asarray(w_qk, np.float64)
  return 0.5 * (w + np.swapaxes(w, -1, -2))


@dataclasses.dataclass
class Spectrum:
  """tr(W), tr(W^2), xi = tr(W) / sqrt(tr(W^2)), eta = sqrt(tr(W^2) / d), theta* (NaN outside (0, 1)); any
  leading shape (e.g. [L, H])."""

  tr_w: np.ndarray
  tr_w2: np.ndarray
  d: float

  @property
  def xi(self) -> np.ndarray:
    return self.tr_w / np.sqrt(self.tr_w2)

  @property
  def eta(self) -> np.ndarray:
    return np.sqrt(self.tr_w2 / self.d)

  @property
  def theta_star(self) -> np.ndarray:
    """1/2 + sqrt(d) / (2 tr(W)), NaN when outside (0, 1) (no interior peak: the uniform regime)."""
    with np.errstate(divide="ignore", invalid="ignore"):
      t = 0.5 + np.sqrt(self.d) / (2.0 * self.tr_w)
    return np.where((t > 0) & (t < 1), t, np.nan)


def spectrum(w_qk: np.ndarray, d: float, sigma: np.ndarray | None = None) -> Spectrum:
  """Trace statistics of W = sym(W_QK) Sigma for W_QK [..., E, E] and Sigma [E, E] (default identity)."""
  m = symmetrize(w_qk)
  w = m if sigma is None else m @ np.asarray(sigma, np.float64)
  tr_w = np.trace(w, axis1=-2, axis2=-1)
  tr_w2 = np.einsum("...ij,...ji->...", w, w)
  return Spectrum(tr_w=tr_w, tr_w2=tr_w2, d=float(d))


def spectrum_from_factors(a: np.ndarray, b: np.ndarray, d: float, sigma: np.ndarray | None = None) -> Spectrum:
  """`spectrum` of W_QK = a^T b without forming the E x E matrix: a, b [..., D, E] (a head's query and key maps).

  With M = sym(a^T b), P = b Sigma a^T, Q_a = a Sigma a^T, Q_b = b Sigma b^T (all D x D):
  tr(M Sigma) = tr(P) and tr((M Sigma)^2) = (tr(P^2) + tr(Q_a Q_b)) / 2. Memory O(D E) per head, so 7B-size
  heads (E = 4096) are cheap; an [E, E] sigma costs D E^2 per head.
  """
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  a_s = a if sigma is None else a @ np.asarray(sigma, np.float64)
  b_s = b if sigma is None else b @ np.asarray(sigma, np.float64)
  p = np.einsum("...ie,...je->...ij", b_s, a)  # b Sigma a^T
  qa = np.einsum("...ie,...je->...ij", a_s, a)
  qb = np.einsum("...ie,...je->...ij", b_s, b)
  tr_w = np.trace(p, axis1=-2, axis2=-1)
  tr_w2 = 0.5 * (np.einsum("...ij,...ji->...", p, p) + np.einsum("...ij,...ji->...", qa, qb))
  return Spectrum(tr_w=tr_w, tr_w2=tr_w2, d=float(d))


def variance_coefficient(theta: np.ndarray, variant: str = "corrected") -> np.ndarray:
  """c(theta) with v = c(theta) tr(W^2) / d: 2 theta^2 - 2 theta + 7/12 (corrected) or 2 theta^2 + 7/12 (paper)."""
  if variant not in VARIANTS:
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
  theta = np.asarray(theta, np.float64)
  return 2 * theta**2 + 7.0 / 12.0 - (2 * theta if variant == "corrected" else 0.0)


def rho_closed_form(theta: np.ndarray, tr_w, tr_w2, d: float, variant: str = "corrected") -> np.ndarray:
  """Equation (7): rho(theta) for scalars (or arrays broadcasting with theta) tr(W), tr(W^2)."""
  theta = np.asarray(theta, np.float64)
  den = np.sqrt(np.asarray(tr_w2, np.float64)) * np.sqrt(2 * variance_coefficient(theta, variant))
  a = (theta - 0.5) * np.asarray(tr_w, np.float64)
  return 0.5 * (erf(a / den) - erf((a - np.sqrt(d)) / den))


def rho_finite(num_tokens: int, tr_w, tr_w2, d: float) -> np.ndarray:
  """Equation (2) with the exact mean and variance of <gamma^i, omega> + 1/T at finite T; [T] for i = 1..T."""
  t = num_tokens
  i = np.arange(1, t + 1, dtype=np.float64)
  cross = i - (t + 1) / 2.0  # Cov(x_i - mean_j x_j, x_T) / Sigma
  mins = np.minimum(i[:, None], i[None, :])
  own = i - 2 * mins.mean(1) + mins.mean()  # Var(x_i - mean_j x_j) / Sigma
  mu = cross * tr_w / (t * np.sqrt(d)) + 1.0 / t
  var = (own * t + cross**2) * tr_w2 / (t**2 * d)
  s = np.sqrt(2 * var)
  return 0.5 * (erf(mu / s) + erf((1 - mu) / s))


def rho_monte_carlo(w_qk: np.ndarray | tuple, num_tokens: int, d: float, sigma: np.ndarray | None = None,
                    num_draws: int = 4000, seed: int = 0, chunk: int = 500) -> np.ndarray:
  """Equation (1) measured directly: draw Gaussian random walks (Assumption 1), compute omega and count.

  Args:
    w_qk: [E, E] query-key matrix (symmetrised here, as Lemma 2 prescribes), or its factors (a, b) [D, E] with
      W_QK = a^T b (then omega_j = ((a x_j) . (b x_T) + (b x_j) . (a x_T)) / 2 / sqrt(d): no E x E matrix).
    num_tokens: T.
    d: the logit scale dimension.
    sigma: [E, E] step covariance (default identity).
    num_draws: N walks. The standard error of each rho_i is at most 0.5 / sqrt(N).

  Returns:
    [T] the fraction of walks with <gamma^i, omega> + 1/T in [0, 1], for i = 1..T.
  """
  factors = isinstance(w_qk, tuple)
  if factors:
    fa, fb = (np.asarray(f, np.float64) for f in w_qk)
    e = fa.shape[-1]
  else:
    m = symmetrize(w_qk)
    e = m.shape[-1]
  chol = np.linalg.cholesky(np.eye(e) if sigma is None else np.asarray(sigma, np.float64))
  rng = np.random.default_rng(seed)
  t = num_tokens
  hits = np.zeros(t)
  for start in range(0, num_draws, chunk):
    n = min(chunk, num_draws - start)
    x = np.cumsum(rng.standard_normal((n, t, e)) @ chol.T, axis=1)  # [N, T, E]
    if factors:
      ax, bx = x @ fa.T, x @ fb.T  # [N, T, D]
      omega = 0.5 * (np.einsum("ntd,nd->nt", ax, bx[:, -1]) + np.einsum("ntd,nd->nt", bx, ax[:, -1])) / np.sqrt(d)
    else:
      omega = np.einsum("nte,ef,nf->nt", x, m, x[:, -1]) / np.sqrt(d)
    z = omega / t - omega.sum(1, keepdims=True) / t**2 + 1.0 / t
    hits += ((z >= 0) & (z <= 1)).sum(0)
  return hits / num_draws


def step_covariance(states: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
  """Assumption 1's Sigma from token states: the covariance [E, E] of the steps x_{t+1} - x_t.

  Under x_1 ~ N(0, Sigma), x_{t+1} ~ N(x_t, Sigma), Sigma is the covariance of one step of the walk, so it is
  estimated from consecutive differences within each sequence (never across sequences), pooled over all
  sequences. This is the `sigma` of `spectrum`, `head_table` and `rho_monte_carlo`.

  Args:
    states: [..., T, E] token states; every leading index is one sequence.
    mask: [..., T] (1 = real token); a step is used only when both of its tokens are real.

  Returns:
    [E, E] covariance of the steps (mean removed, ddof 1, as np.cov).

  Raises:
    ValueError: when fewer than 2 steps are left.
  """
  x = np.asarray(states, np.float64)
  steps = np.diff(x, axis=-2).reshape(-1, x.shape[-1])
  if mask is not None:
    m = np.asarray(mask).astype(bool)
    steps = steps[(m[..., 1:] & m[..., :-1]).reshape(-1)]
  if steps.shape[0] < 2:
    raise ValueError(f"step_covariance needs at least 2 steps, got {steps.shape[0]} (states {x.shape})")
  return np.cov(steps, rowvar=False)


class StepCovariance:
  """`step_covariance` accumulated one sequence at a time, kept apart per leading index (e.g. one Sigma per
  layer): `update(states [..., T, E])` adds that sequence's T - 1 steps; `covariance()` gives [..., E, E]."""

  def __init__(self):
    self.n = 0
    self.total = None  # [..., E] sum of the steps
    self.outer = None  # [..., E, E] sum of their outer products

  def update(self, states: np.ndarray) -> None:
    steps = np.diff(np.asarray(states, np.float64), axis=-2)  # [..., T - 1, E]
    if self.total is None:
      self.total = np.zeros(steps.shape[:-2] + steps.shape[-1:])
      self.outer = np.zeros(steps.shape[:-2] + steps.shape[-1:] * 2)
    self.total += steps.sum(-2)
    self.outer += np.einsum("...te,...tf->...ef", steps, steps)
    self.n += steps.shape[-2]

  def covariance(self) -> np.ndarray | None:
    """[..., E, E] (ddof 1, as `step_covariance`), or None with fewer than 2 steps seen."""
    if self.n < 2:
      return None
    mean = self.total / self.n
    return (self.outer - self.n * np.einsum("...e,...f->...ef", mean, mean)) / (self.n - 1)


def state_covariance(states: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
  """Covariance [E, E] of the token states themselves [..., T, E] (rows with mask 0 left out).

  Not Assumption 1's Sigma: along a random walk Cov(x_t) = t Sigma, so this grows with the sequence length (kept
  for comparison; use `step_covariance` for the `sigma` option).
  """
  x = np.asarray(states, np.float64).reshape(-1, states.shape[-1])
  if mask is not None:
    x = x[np.asarray(mask).reshape(-1).astype(bool)]
  return np.cov(x, rowvar=False)


def head_table(w_qk: np.ndarray | Spectrum, d: float | None = None, sigma: np.ndarray | None = None,
               num_theta: int = 101, variant: str = "corrected") -> dict[str, np.ndarray]:
  """Per head [L, H]: tr(W), tr(W^2), xi, eta, theta* and the curve rho [L, H, num_theta] on theta in (0, 1].

  w_qk: [L, H, E, E] matrices, or a Spectrum (e.g. from `spectrum_from_factors`; then d and sigma are unused).
  sigma: one [E, E] for all heads, or [L, E, E] per layer (e.g. `step_covariance` of each layer's inputs).
  """
  if isinstance(w_qk, Spectrum):
    spec = w_qk
  else:
    w = np.asarray(w_qk, np.float64)
    if sigma is not None and np.ndim(sigma) == 3:
      sigma = np.asarray(sigma)[:, None]
    spec = spectrum(w, d, sigma)
  d = spec.d
  theta = np.linspace(1.0 / num_theta, 1.0, num_theta)
  rho = rho_closed_form(theta, spec.tr_w[..., None], spec.tr_w2[..., None], d, variant)
  peak = theta[np.argmax(rho, axis=-1)]
  return {"tr_w": spec.tr_w, "tr_w2": spec.tr_w2, "xi": spec.xi, "eta": spec.eta, "theta_star": spec.theta_star,
          "theta": theta, "rho": rho, "rho_peak_theta": peak, "rho_peak": rho.max(-1)}


__all__ = ["Spectrum", "StepCovariance", "VARIANTS", "head_table", "rho_closed_form", "rho_finite", "rho_monte_carlo",
           "spectrum", "spectrum_from_factors", "state_covariance", "step_covariance", "symmetrize",
           "variance_coefficient"]
