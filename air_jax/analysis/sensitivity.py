"""C.2: sensitivity of AIR to lambda, gamma, tau_text and beta, one vmapped sweep (`generate_sweep`) per knob.

Each sweep varies one AIRConfig field of a base config (the others stay at the base values), so all its configs
compile to one spec structure and run as one compiled call per batch of images. Scoring is a callable
(texts -> {"CHAIRs", "CHAIRi", ...}) so any CHAIR setup (COCO, the organism's vocabulary) plugs in.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

# The seed's knobs (Figure 1, Table 1) -> AIRConfig field names.
KNOBS = {"lambda": "visual_factor", "gamma": "text_factor", "tau_text": "tau_text", "beta": "beta"}
# Values around the paper's grid (Figure 1: lambda up to ~20, gamma in (0, 1], tau_text in (0, 1]; Table 1).
DEFAULT_GRID = {
    "lambda": (1.0, 3.5, 7.5, 12.5, 17.5),
    "gamma": (0.02, 0.1, 0.3, 0.6, 1.0),
    "tau_text": (0.05, 0.1, 0.3, 0.6, 1.0),
    "beta": (0.0, 0.3, 0.6, 0.9),
}


def sweep_configs(base, knob: str, values: Sequence[float]) -> list:
  """AIRConfigs equal to `base` except the field of `knob` ("lambda", "gamma", "tau_text" or "beta")."""
  if knob not in KNOBS:
    raise ValueError(f"unknown knob {knob!r}; expected one of {sorted(KNOBS)}")
  return [base.replace(**{KNOBS[knob]: float(v)}) for v in values]


def run_sweeps(model, base, images: Sequence, prompt: str, score: Callable[[list[str]], Mapping[str, float]], *,
               grid: Mapping[str, Sequence[float]] | None = None, max_new_tokens: int = 64, batch_size: int = 50,
               greedy_texts: list[str] | None = None) -> dict[str, dict]:
  """Captions `images` with every config of every knob's sweep and scores them.

  Returns knob -> {"field", "values", "C_S", "C_I" (percent), "recall", "F1", "greedy_C_S", "greedy_C_I"}.
  """
  from air_jax.generate import generate, generate_sweep

  grid = dict(DEFAULT_GRID if grid is None else grid)
  if greedy_texts is None:
    greedy_texts = []
    for s in range(0, len(images), batch_size):
      greedy_texts += generate(model, None, list(images[s:s + batch_size]), prompt,
                               max_new_tokens=max_new_tokens).texts
  g = score(greedy_texts)
  out = {}
  for knob, values in grid.items():
    cfgs = sweep_configs(base, knob, values)
    texts: list[list[str]] = [[] for _ in cfgs]
    for s in range(0, len(images), batch_size):
      gens = generate_sweep(model, cfgs, list(images[s:s + batch_size]), prompt, max_new_tokens=max_new_tokens)
      for acc, gen in zip(texts, gens):
        acc.extend(gen.texts)
    metrics = [score(t) for t in texts]
    out[knob] = {"field": KNOBS[knob], "values": [float(v) for v in values],
                 "C_S": [100 * m["CHAIRs"] for m in metrics], "C_I": [100 * m["CHAIRi"] for m in metrics],
                 "recall": [100 * m.get("Recall", float("nan")) for m in metrics],
                 "F1": [100 * m.get("F1", float("nan")) for m in metrics],
                 "greedy_C_S": 100 * g["CHAIRs"], "greedy_C_I": 100 * g["CHAIRi"]}
  return out


__all__ = ["DEFAULT_GRID", "KNOBS", "run_sweeps", "sweep_configs"]
