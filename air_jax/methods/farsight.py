"""FarSight (Tang et al., CVPR 2025, arXiv 2505.16652, "Seeing Far and Clearly"): attention registers in the
upper triangle of the causal mask with a positional-awareness decay.

This is our reading of the paper; the official code (FeilongTangmonash/FarSight, Shell/farsight_patch.py,
found after this was written) differs (no KV cache, registers only up to the current
length, a row-dependent and a per-head ALiBi decay, sigma = 0.8): see the README's "Decoding methods". Ours is
our reading of the paper (and of the AIR paper's supplementary C.1:
"decay rate sigma = log_alpha(seq), alpha = 1024 the typical maximum token limit"). What we implement:
- Registers. The causal mask's upper triangle (the key slots after the query's own slot, up to the end of the
  generation window) no longer holds -inf but register logits that take part in the softmax and absorb
  attention that would otherwise go to outlier tokens: for query slot i and key slot j > i, the register logit
  is -(j - i) * sigma (the positional-awareness decay: the farther the slot, the smaller its share).
- After the softmax the register columns are dropped (the row keeps the mass of its real keys, summing to < 1;
  no renormalisation), so the output only mixes real values.
- sigma = log(seq) / log(alpha), per example, with seq = the example's real prompt length + max_new_tokens (the
  length of its causal mask over the whole generation). The window is the KV cache: registers stand at every
  slot after the query up to the last slot, in prefill and in every decoding step, so their total mass shrinks
  as generation proceeds (the "diminishing masking rate").
- Every layer and every head (the causal mask is shared); `layers` narrows this (scaled like AIRConfig ranges).
Our reading, not stated in the paper: the exact register values, where the window ends (max_new_tokens), and
that the visible (lower-triangle) logits are left untouched. Preset "farsight": alpha 1024, all layers.
`enabled=False` is exactly plain decoding (same compiled graph).
"""

from __future__ import annotations

import dataclasses
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from air_jax.air_config import scale_layer_range
from air_jax.methods.base import CompiledMethod, ConfigMixin, Plan, check_bool, check_number
from air_jax.methods.pai import _check_range
from air_jax.methods.registry import register
from models.segments import PAD
from models.spec import RectificationSpec


@flax.struct.dataclass
class RegisterOp:
  """Sites `masked` (register logits at slots after the query) and `pattern` (registers dropped)."""

  on: jax.Array  # [L] 0/1
  log_alpha: jax.Array  # [L], log(alpha)

  def _registers(self, ctx):
    s = ctx.key_segments.shape[-1]
    slots = jnp.arange(s)
    dist = (slots[None, :] - ctx.query_slot[:, None]).astype(jnp.float32)  # [T, S]
    real = ctx.key_segments != PAD
    first = jnp.argmax(real, axis=-1)  # left padding before the first real slot
    seq = (s - first).astype(jnp.float32)  # real prompt + generation window
    sigma = jnp.log(jnp.maximum(seq, 2.0)) / self.log_alpha  # [B]
    future = (dist > 0)[None, None] & (ctx.query_segments != PAD)[:, None, :, None] & (self.on > 0.5)
    return future, -dist[None, None] * sigma[:, None, None, None]  # [B, 1, T, S]

  def edit_masked(self, scores, ctx):
    future, reg = self._registers(ctx)
    return jnp.where(future, reg, scores)

  def edit_pattern(self, pattern, ctx):
    future, _ = self._registers(ctx)
    return jnp.where(future, 0.0, pattern)


@flax.struct.dataclass
class FarSightValues:
  on: jax.Array  # [L]
  log_alpha: jax.Array


@dataclasses.dataclass(frozen=True)
class FarSightPlan(Plan):

  def spec(self, values: FarSightValues, batch: int, config) -> RectificationSpec:
    del batch
    text = config.dims
    nl, nh = text.num_hidden_layers, text.num_attention_heads
    op = RegisterOp(on=values.on, log_alpha=jnp.broadcast_to(values.log_alpha, (nl,)))
    return RectificationSpec(head_gate=jnp.ones((nl, nh), jnp.float32), extra=(op,))


@dataclasses.dataclass(frozen=True)
class FarSightConfig(ConfigMixin):
  """alpha > 1: base of sigma = log_alpha(seq); enabled: False = plain decoding; layers: half-open range of a
  `layer_ref`-layer model (None = all layers)."""

  name: str = "farsight"
  alpha: float = 1024.0
  enabled: bool = True
  layers: tuple[int, int] | None = None
  layer_ref: int | None = 32

  def __post_init__(self):
    check_number("FarSightConfig", "alpha", self.alpha, lo=1.0, lo_open=True)
    check_bool("FarSightConfig", "enabled", self.enabled)
    _check_range("FarSightConfig", "layers", self.layers, self.layer_ref)

  def compile(self, model_config) -> CompiledMethod:
    nl = int(getattr(model_config, "text", model_config).num_hidden_layers)
    start, stop = scale_layer_range(self.layers, nl, self.layer_ref)
    if stop > nl:
      raise ValueError(f"FarSightConfig.layers={list(self.layers)} is outside the model's {nl} layers")
    on = np.zeros(nl, np.float32)
    on[start:stop] = float(self.enabled)
    values = FarSightValues(on=jnp.asarray(on), log_alpha=jnp.asarray(math.log(self.alpha), jnp.float32))
    return CompiledMethod(plan=FarSightPlan(), values=values)


register("farsight", lambda **kw: FarSightConfig(**kw),
         "FarSight: attention registers with positional decay in the causal mask (alpha 1024; our reading)")
