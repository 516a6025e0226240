"""The seed's analyses as pure functions: A.2 similarity, B.1 propagation probability, B.2 variance/entropy,
MAI/TAI, C.2 sensitivity sweeps, C.3 cost, and their figures. The CLI is `python -m eval.analyze`.

Modules: `similarity` (A.2), `propagation` (B.1), `attention_stats` (B.2), `imbalance` (MAI, TAI),
`sensitivity` (C.2), `cost` (C.3), `figures`; `model_io` is the one place that reads a model's internals and
`base_llm` loads a separate base LLM.
"""

from air_jax.analysis.attention_stats import generating_rows, row_entropy, row_variance, \
  variance_entropy_correlation
from air_jax.analysis.cost import read_methods_json
from air_jax.analysis.imbalance import distance_to_next, head_mask, high_tai_tokens, mai, mai_summary, \
  pooled_mai, tai, \
  within_fraction
from air_jax.analysis.propagation import Spectrum, StepCovariance, head_table, rho_closed_form, rho_finite, \
  rho_monte_carlo, spectrum, spectrum_from_factors, state_covariance, step_covariance, symmetrize
from air_jax.analysis.sensitivity import DEFAULT_GRID, KNOBS, run_sweeps, sweep_configs
from air_jax.analysis.similarity import cosine, group_means, head_similarity, output_block, \
  uniform_causal_block

__all__ = [
  "DEFAULT_GRID", "KNOBS", "Spectrum", "StepCovariance", "cosine", "distance_to_next", "generating_rows", "group_means",
  "head_mask", "head_similarity", "head_table", "high_tai_tokens", "mai", "mai_summary", "output_block", "pooled_mai",
  "read_methods_json", "rho_closed_form", "rho_finite", "rho_monte_carlo", "row_entropy", "row_variance",
  "run_sweeps", "spectrum", "spectrum_from_factors", "state_covariance", "step_covariance", "sweep_configs",
  "symmetrize", "tai", "uniform_causal_block",
  "variance_entropy_correlation", "within_fraction",
]
