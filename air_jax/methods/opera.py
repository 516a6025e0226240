"""OPERA, "Over-trust Penalty and Retrospection-Allocation" (Huang et al., CVPR 2024; official code shikiw/OPERA).

A method that brings its own search: beam search whose candidates are penalised by a column-wise product of the
last layer's (head-max) self-attention over the generated tokens, with roll-back to the "summary token" when the
penalty keeps pointing at the same column. The search itself is `air_jax.opera_search` (one compiled loop).

Preset "opera" (the official CHAIR run for LLaVA-1.5, `chair_eval.py` / README of shikiw/OPERA): num_beams 5,
scale_factor 50, threshold 15, num_attn_candidates 5, window_size 512, penalty_weights 1.0, length penalty 1.0,
no early stopping, `length_normalization="official"` (transformers 4.29's BeamSearchScorer: a hypothesis score is
divided by its whole length, prompt included, with the image counted as one token as in the official LLaVA input
ids); "generated" divides by the generated tokens instead (transformers 5.x). The first 10 tokens are penalised by
(minus) their image attention and roll-back locations below 10 are ignored (constants of the official code).

Differences from the official code, all documented: several examples run as independent searches (the official
runs batch 1; batched, its roll-back test would pool the beams of every example); max_new_tokens must not exceed
window_size (the official history window clamp never fires then); the image attention sums the image-segment keys
(the official sums the contiguous range image_start..image_end, the same for LLaVA's single image run).
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

from air_jax.methods.base import CompiledMethod, ConfigMixin, Plan, check_bool, check_int, check_number
from air_jax.methods.registry import register

NORMALIZATIONS = ("official", "generated")


@flax.struct.dataclass
class OperaValues:
  scale_factor: jax.Array
  threshold: jax.Array
  penalty_weight: jax.Array
  length_penalty: jax.Array
  official: jax.Array  # 1: length_normalization "official", 0: "generated" (traced, one compilation for both)


@dataclasses.dataclass(frozen=True)
class OperaPlan(Plan):
  num_beams: int = 5
  num_candidates: int = 5
  window_size: int = 512
  early_stopping: bool = False
  searches = True

  def search(self, values, params, config, input_ids, attention_mask, pixel_values, *, max_new_tokens: int,
             eos_ids, pad_id: int) -> dict:
    from air_jax.opera_search import opera_search_jit

    if max_new_tokens > self.window_size:
      raise ValueError(f"OperaConfig.window_size={self.window_size} is smaller than max_new_tokens="
                       f"{max_new_tokens}: raise window_size or lower max_new_tokens")
    return opera_search_jit(params, config, input_ids, attention_mask, pixel_values, values,
                            num_beams=self.num_beams, num_candidates=self.num_candidates,
                            max_new_tokens=max_new_tokens, eos_ids=tuple(eos_ids), pad_id=pad_id,
                            early_stopping=self.early_stopping)


@dataclasses.dataclass(frozen=True)
class OperaConfig(ConfigMixin):
  """num_beams >= 1; scale_factor > 0 (attention scale before the column product); threshold > 0 (roll back when
  a location was the mode more than this many times); num_attn_candidates >= 1 (top logits per beam scored, and
  the maximum roll-backs per position); window_size >= 1 (max generated tokens); penalty_weight >= 0;
  length_penalty (exponent of the hypothesis length); length_normalization "official" | "generated"."""

  name: str = "opera"
  num_beams: int = 5
  scale_factor: float = 50.0
  threshold: float = 15
  num_attn_candidates: int = 5
  window_size: int = 512
  penalty_weight: float = 1.0
  length_penalty: float = 1.0
  length_normalization: str = "official"
  early_stopping: bool = False

  def __post_init__(self):
    o = "OperaConfig"
    check_int(o, "num_beams", self.num_beams, lo=1)
    check_number(o, "scale_factor", self.scale_factor, lo=0.0, lo_open=True)
    check_number(o, "threshold", self.threshold, lo=0.0, lo_open=True)
    check_int(o, "num_attn_candidates", self.num_attn_candidates, lo=1)
    check_int(o, "window_size", self.window_size, lo=1)
    check_number(o, "penalty_weight", self.penalty_weight, lo=0.0)
    check_number(o, "length_penalty", self.length_penalty)
    check_bool(o, "early_stopping", self.early_stopping)
    if self.length_normalization not in NORMALIZATIONS:
      raise ValueError(f"{o}.length_normalization must be one of {NORMALIZATIONS}, got {self.length_normalization!r}")

  def compile(self, model_config) -> CompiledMethod:
    del model_config
    f = lambda x: jnp.asarray(x, jnp.float32)
    values = OperaValues(scale_factor=f(self.scale_factor), threshold=f(self.threshold),
                         penalty_weight=f(self.penalty_weight), length_penalty=f(self.length_penalty),
                         official=f(self.length_normalization == "official"))
    plan = OperaPlan(num_beams=self.num_beams, num_candidates=self.num_attn_candidates,
                     window_size=self.window_size, early_stopping=self.early_stopping)
    return CompiledMethod(plan=plan, values=values)


register("opera", lambda **kw: OperaConfig(**kw),
         "OPERA: beam search with over-trust penalty and roll-back (beams 5, scale 50, threshold 15, "
         "candidates 5; official LLaVA-1.5)")
