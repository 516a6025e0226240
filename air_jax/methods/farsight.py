"""FarSight (Tang et al., CVPR 2025, arXiv 2505.16652, "Seeing Far and Clearly"): attention registers in the
upper triangle of the causal mask with a positional-awareness decay.

The default (`mode="paper"`) is our reading of the paper and of the AIR paper's supplementary C.1 ("decay rate
sigma = log_alpha(seq), alpha = 1024 the typical maximum token limit"); the official code (FeilongTangmonash/
FarSight, Shell/farsight_patch.py, found after this was written) differs and is `mode="official"` (below and the
README's "Decoding methods"). The paper mode:
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
- Padding is no position: distances count real keys and the unwritten window only, so padding inside a row
  (InstructBLIP's gap after its query tokens) neither holds a register nor adds to a distance or to seq (in both
  modes); a row equals the same example without padding.
Our reading, not stated in the paper: the exact register values, where the window ends (max_new_tokens), and
that the visible (lower-triangle) logits are left untouched. Preset "farsight": alpha 1024, all layers.
`enabled=False` is exactly plain decoding (same compiled graph).

`mode="official"` follows the official `farsight_attention_forward_v2` instead (greedy, its own cache-free search,
as the official run decodes with `use_cache=False`): every step recomputes the whole sequence of current length
n (real tokens), and row i gets registers only at the real slots j in (i, n) with logit
-(j - i) (sigma (1 - i / (4 (n - 1))) + alibi * 2^(-8 (h + 1) / H)) (its half "basic", half "progressive" decay
plus a per-head ALiBi slope; i, j counted from the first real token), sigma = `sigma` (official 0.8 =
log_1024(256)); after the softmax the register columns are dropped, as above. The current row has no register,
so the edit reaches the next token only through the earlier rows. Cost: one full forward per new token.
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
    # Slots that count: real keys and the unwritten generation window after the last query; padding inside the
    # prompt (InstructBLIP's gap after the query tokens) is neither a register nor a unit of distance.
    window = slots[None, :] > jnp.max(ctx.query_slot)
    counted = (ctx.key_segments != PAD) | window  # [B, S]
    rank = (jnp.cumsum(counted, axis=-1) - 1).astype(jnp.float32)  # [B, S]
    qrank = jnp.take(rank, ctx.query_slot, axis=-1)  # [B, T]
    dist = rank[:, None, :] - qrank[:, :, None]  # [B, T, S]
    seq = counted.sum(-1).astype(jnp.float32)  # real prompt + generation window
    sigma = jnp.log(jnp.maximum(seq, 2.0)) / self.log_alpha  # [B]
    future = ((dist > 0) & counted[:, None, :])[:, None] & (ctx.query_segments != PAD)[:, None, :, None] \
        & (self.on > 0.5)
    return future, -dist[:, None] * sigma[:, None, None, None]  # [B, 1, T, S]

  def edit_masked(self, scores, ctx):
    future, reg = self._registers(ctx)
    return jnp.where(future, reg, scores)

  def edit_pattern(self, pattern, ctx):
    future, _ = self._registers(ctx)
    return jnp.where(future, 0.0, pattern)


@flax.struct.dataclass
class OfficialRegisterOp:
  """Sites `masked` / `pattern` of the official variant (full-sequence forwards; see the module docstring)."""

  on: jax.Array  # [L] 0/1
  sigma: jax.Array  # [L]
  alibi: jax.Array  # [L] 0/1

  def _future(self, ctx):
    """(future [B, 1, T, S]: the register slots, dist [B, T, S]: key minus query position, qpos [B, T], n [B])."""
    real = ctx.key_segments != PAD  # [B, S]
    n = real.sum(-1).astype(jnp.float32)  # [B] real tokens so far
    pos = (jnp.cumsum(real, axis=-1) - 1).astype(jnp.float32)  # [B, S] rank of each slot among the real ones
    qpos = jnp.take(pos, ctx.query_slot, axis=-1)  # [B, T]
    dist = pos[:, None, :] - qpos[:, :, None]  # [B, T, S]
    rows = (ctx.query_segments != PAD)[:, :, None]
    future = (dist > 0) & real[:, None, :] & rows & (self.on > 0.5)  # [B, T, S]
    return future[:, None], dist, qpos, n

  def edit_masked(self, scores, ctx):
    future, dist, qpos, n = self._future(ctx)
    num_heads = scores.shape[1]
    decay = self.sigma * (1.0 - qpos / (4.0 * jnp.maximum(n[:, None] - 1.0, 1.0)))  # [B, T]
    slope = 2.0 ** (-8.0 * (jnp.arange(num_heads, dtype=jnp.float32) + 1.0) / num_heads) * self.alibi  # [H]
    reg = -dist[:, None] * (decay[:, None, :, None] + slope[None, :, None, None])  # [B, H, T, S]
    return jnp.where(future, reg, scores)

  def edit_pattern(self, pattern, ctx):  # the register columns leave the softmax's output
    return jnp.where(self._future(ctx)[0], 0.0, pattern)


@flax.struct.dataclass
class OfficialValues:
  on: jax.Array  # [L]
  sigma: jax.Array
  alibi: jax.Array


def official_search(params, config, input_ids, attention_mask, pixel_values, values: OfficialValues, *,
                    max_new_tokens: int, eos_ids=(), pad_id: int = 0) -> dict:
  """Greedy decoding without a KV cache: each step one full forward over prompt + tokens so far (the buffer's
  unwritten tail is masked as padding, so it holds no register). Returns tokens, num_tokens and the per-step
  logits ("scores" [B, N, V])."""
  from air_jax.decoding import _is_eos
  from models import family

  b, t = input_ids.shape
  n = max_new_tokens
  nl, nh = config.dims.num_hidden_layers, config.dims.num_attention_heads
  op = OfficialRegisterOp(on=values.on, sigma=jnp.broadcast_to(values.sigma, (nl,)),
                          alibi=jnp.broadcast_to(values.alibi, (nl,)))
  spec = RectificationSpec(head_gate=jnp.ones((nl, nh), jnp.float32), extra=(op,))
  ids = jnp.concatenate([input_ids, jnp.full((b, n), pad_id, input_ids.dtype)], axis=1)
  mask = jnp.concatenate([attention_mask, jnp.zeros((b, n), attention_mask.dtype)], axis=1)

  def step(i, carry):
    ids, mask, done, num, scores = carry
    logits = family.forward(params, config, ids, pixel_values, attention_mask=mask, spec=spec)["logits"]
    row = jax.lax.dynamic_index_in_dim(logits, t + i - 1, axis=1, keepdims=False).astype(jnp.float32)  # [B, V]
    tok = jnp.where(done, pad_id, jnp.argmax(row, -1).astype(ids.dtype))
    ids = jax.lax.dynamic_update_slice(ids, tok[:, None], (0, t + i))
    mask = jax.lax.dynamic_update_slice(mask, (~done).astype(mask.dtype)[:, None], (0, t + i))
    num = num + (~done).astype(jnp.int32)
    scores = jax.lax.dynamic_update_slice(scores, row[:, None], (0, i, 0))
    return ids, mask, done | _is_eos(tok, eos_ids), num, scores

  vocab = config.dims.vocab_size
  init = (ids, mask, jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32), jnp.zeros((b, n, vocab), jnp.float32))
  ids, _, _, num, scores = jax.lax.fori_loop(0, n, step, init)
  return {"tokens": ids[:, t:].astype(jnp.int32), "num_tokens": num, "scores": scores}


official_search_jit = jax.jit(official_search, static_argnames=("config", "max_new_tokens", "eos_ids", "pad_id"))


@dataclasses.dataclass(frozen=True)
class FarSightOfficialPlan(Plan):
  searches = True

  def search(self, values, params, config, input_ids, attention_mask, pixel_values, *, max_new_tokens: int,
             eos_ids, pad_id: int) -> dict:
    return official_search_jit(params, config, input_ids, attention_mask, pixel_values, values,
                               max_new_tokens=max_new_tokens, eos_ids=tuple(eos_ids), pad_id=pad_id)


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
  `layer_ref`-layer model (None = all layers); mode: "paper" (our reading, in the compiled loop) or "official"
  (the official code's registers, in its own cache-free greedy search; sigma and alibi apply to it only)."""

  name: str = "farsight"
  alpha: float = 1024.0
  enabled: bool = True
  layers: tuple[int, int] | None = None
  layer_ref: int | None = 32
  mode: str = "paper"
  sigma: float = math.log(256) / math.log(1024)  # the official default decay
  alibi: bool = True  # the official per-head ALiBi term (its --farsight-no-alibi turns it off)

  def __post_init__(self):
    check_number("FarSightConfig", "alpha", self.alpha, lo=1.0, lo_open=True)
    check_bool("FarSightConfig", "enabled", self.enabled)
    check_bool("FarSightConfig", "alibi", self.alibi)
    check_number("FarSightConfig", "sigma", self.sigma, lo=0.0)
    if self.mode not in ("paper", "official"):
      raise ValueError(f"FarSightConfig.mode must be 'paper' or 'official', got {self.mode!r}")
    _check_range("FarSightConfig", "layers", self.layers, self.layer_ref)

  def compile(self, model_config) -> CompiledMethod:
    nl = int(getattr(model_config, "text", model_config).num_hidden_layers)
    start, stop = scale_layer_range(self.layers, nl, self.layer_ref)
    if stop > nl:
      raise ValueError(f"FarSightConfig.layers={list(self.layers)} is outside the model's {nl} layers")
    on = np.zeros(nl, np.float32)
    on[start:stop] = float(self.enabled)
    if self.mode == "official":
      values = OfficialValues(on=jnp.asarray(on), sigma=jnp.asarray(self.sigma, jnp.float32),
                              alibi=jnp.asarray(float(self.alibi), jnp.float32))
      return CompiledMethod(plan=FarSightOfficialPlan(), values=values)
    values = FarSightValues(on=jnp.asarray(on), log_alpha=jnp.asarray(math.log(self.alpha), jnp.float32))
    return CompiledMethod(plan=FarSightPlan(), values=values)


register("farsight", lambda **kw: FarSightConfig(**kw),
         "FarSight: attention registers with positional decay in the causal mask (alpha 1024; our reading)")
