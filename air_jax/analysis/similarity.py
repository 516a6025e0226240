"""A.2: cosine similarity of the LVLM's and the base LLM's attention on the output tokens, per layer and head.

Shape legend: L layers, H heads, T output tokens; attention maps [..., S, S] of full teacher-forced passes
(the two models' sequences may differ in length: the image is one placeholder for the LLM).

  A~ = A[-T:, -T:]        Sim^(l,h) = cos(vec A~_LVLM, vec A~_LLM)
  S_hal = E_samples E_(l,h) in sensitive Sim,   S_non = E_samples E_(l,h) in insensitive Sim
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def output_block(attn: np.ndarray, num_output: int) -> np.ndarray:
  """A[..., -T:, -T:] (the output tokens attending to the output tokens)."""
  if num_output < 1 or num_output > attn.shape[-1]:
    raise ValueError(f"num_output must be in [1, {attn.shape[-1]}], got {num_output}")
  return attn[..., -num_output:, -num_output:]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Cosine similarity of the flattened last two axes: [..., T, T] x [..., T, T] -> [...]."""
  x = np.asarray(a, np.float64).reshape(a.shape[:-2] + (-1,))
  y = np.asarray(b, np.float64).reshape(b.shape[:-2] + (-1,))
  den = np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1)
  return np.where(den > 0, (x * y).sum(-1) / np.where(den > 0, den, 1.0), np.nan)


def head_similarity(lvlm_attn: np.ndarray, llm_attn: np.ndarray, num_output: int) -> np.ndarray:
  """Sim [L, H] for one sample from [L, H, S1, S1] and [L, H, S2, S2]."""
  if lvlm_attn.shape[:2] != llm_attn.shape[:2]:
    raise ValueError(f"the LVLM has {lvlm_attn.shape[:2]} (layers, heads) but the base LLM {llm_attn.shape[:2]}; "
                     "A.2 compares a model with its own base LLM")
  return cosine(output_block(lvlm_attn, num_output), output_block(llm_attn, num_output))


def group_means(sim: np.ndarray, hal_heads: Sequence, non_hal_heads: Sequence) -> dict[str, float]:
  """S_hal, S_non (and all heads) from Sim [..., L, H] (leading sample axes averaged)."""
  s = np.asarray(sim, np.float64)

  def mean(heads):
    if not len(heads):
      return float("nan")
    vals = np.stack([s[..., int(l), int(h)] for l, h in heads], -1)
    return float(np.nanmean(vals))

  return {"S_hal": mean(hal_heads), "S_non": mean(non_hal_heads), "S_all": float(np.nanmean(s))}


__all__ = ["cosine", "group_means", "head_similarity", "output_block"]
