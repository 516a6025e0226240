"""PAI, "Paying More Attention to Image" (Liu et al., ECCV 2024; official code LALBJ/PAI).

Two parts, both from the official code:
1. Attention amplification (`attention.py`, `llama_new_forward`): in layers [start, end), every head, for the
   last query row only (the last prompt row in prefill, the current row in decoding), the image-key logits
   (after the 1/sqrt(d) scale and the mask) become s + alpha * |s|. Applied to the main view only (the official
   code switches it off, `use_cfg`, while running the text-only view).
2. Image-centric logit refinement (`CFG.py`, `CFGLogits`) against a text-only view: the same prompt with the
   image tokens removed (`init_cfg_processor`: BOS + the text before the image + the text after it), run as
   extra batch rows fed the same tokens. With s = log_softmax(l) of the main view and u = log_softmax of the
   text-only view: out = gamma * (s - u) + u, out := -inf where s < log(0.1) + max(s); gamma = 1 returns s.

Preset "pai" (the official README's CHAIR / POPE command for LLaVA-1.5): alpha 0.2, gamma 1.1, layers [2, 32)
of the 32-layer model (scaled to other depths like AIRConfig ranges), plausibility 0.1. The official argparse
default gamma is 2; the README command (used for the paper's tables) passes 1.1.

Official vs paper, both offered (`official_prefill`): the paper amplifies image attention at every generated
token (default). The official run does not amplify the prompt pass when the text-only view is on: `llama_modify`
sets the layers' `use_cfg` flag, which disables the amplification, and only `CFGLogits` clears it, after the
first token; with gamma = 1 `CFGLogits` returns before clearing it, so nothing is ever amplified.
`official_prefill=True` reproduces both (the first token of the official run then comes from the plain prompt
pass); without the text-only view (`use_cfg=False`) both modes amplify from the prompt pass on.

Neutral: alpha 0 and gamma 1 decode exactly like greedy (gamma 1 gives log-probabilities, the same argmax).
In the HF LLaVA layout the text-only view keeps the template's newline after the image token (the official
LLaVA template has a space there): it is the same prompt, token for token, without the image tokens. Families
that frame each image (Qwen2.5-VL's <|vision_start|> / <|vision_end|>, InternVL's <img> / </img>) lose the frame
with the image, so the view is the chat template's text-only prompt up to how the tokenizer splits the text
after the frame (InternVL keeps the template's newline after the image, as LLaVA does); InstructBLIP's view drops
the query tokens.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from air_jax.air_config import scale_layer_range
from air_jax.methods.base import (CompiledMethod, ConfigMixin, Plan, ViewInputs, below_plausibility, check_bool,
                                  check_int, check_number, concat_views, per_view_rows, text_only_positions,
                                  without_image_tokens)
from air_jax.methods.registry import register
from models.segments import IMAGE, PAD
from models.spec import RectificationSpec


@flax.struct.dataclass
class PAIAttentionOp:
  """Site `scores`: last row, image keys: s + alpha * |s| where on[L] and rows[R] (leaves lead with L)."""

  alpha: jax.Array  # [L]
  on: jax.Array  # [L] 0/1
  rows: jax.Array  # [L, R] 0/1
  prefill_on: jax.Array | None = None  # [L] 0/1: also in the prompt pass (None: 1)

  def edit_scores(self, scores, ctx):
    on = self.on > 0.5
    if ctx.prefill and self.prefill_on is not None:  # static: the prompt pass
      on = on & (self.prefill_on > 0.5)
    edit = on & (self.rows > 0.5)[:, None, None, None]  # [R, 1, 1, 1]
    last = ctx.last_row[None, None, :, None] & (ctx.query_segments != PAD)[:, None, :, None]
    image = (ctx.key_segments == IMAGE)[:, None, None, :]
    return jnp.where(edit & last & image, scores + self.alpha * jnp.abs(scores), scores)


@flax.struct.dataclass
class PAIValues:
  alpha: jax.Array
  gamma: jax.Array
  plausibility: jax.Array
  layers: jax.Array  # [L] 0/1
  prefill: jax.Array = None  # [] 0/1: amplify in the prompt pass too (None: 1)


@dataclasses.dataclass(frozen=True)
class PAIPlan(Plan):
  num_views: int = 2

  def views(self, values, inputs: ViewInputs, config) -> ViewInputs:
    if self.num_views == 1:
      return inputs
    return concat_views(inputs, without_image_tokens(inputs, is_image=text_only_positions(inputs, config)))

  def spec(self, values: PAIValues, batch: int, config) -> RectificationSpec:
    text = config.dims
    nl, nh = text.num_hidden_layers, text.num_attention_heads
    rows = per_view_rows(self.num_views, batch, (0,))
    prefill_on = None if values.prefill is None else jnp.broadcast_to(values.prefill, (nl,))
    op = PAIAttentionOp(alpha=jnp.broadcast_to(values.alpha, (nl,)), on=values.layers,
                        rows=jnp.broadcast_to(rows, (nl,) + rows.shape), prefill_on=prefill_on)
    return RectificationSpec(head_gate=jnp.ones((nl, nh), jnp.float32), extra=(op,))

  def combine(self, values: PAIValues, logits, exit_logits, state):
    del exit_logits, state
    if self.num_views == 1:
      return logits[0]
    s = jax.nn.log_softmax(logits[0], axis=-1)
    u = jax.nn.log_softmax(logits[1], axis=-1)
    out = values.gamma * (s - u) + u
    out = jnp.where(below_plausibility(s, values.plausibility), -jnp.inf, out)
    return jnp.where(values.gamma == 1, s, out)


@dataclasses.dataclass(frozen=True)
class PAIConfig(ConfigMixin):
  """alpha >= 0 (attention amplification), gamma >= 0 (logit refinement; 1 = none), plausibility in (0, 1],
  layers: half-open range of a `layer_ref`-layer model (None = all), use_cfg: run the text-only view,
  official_prefill: follow the official code's `use_cfg` flag (no amplification in the prompt pass with the
  text-only view on, none at all with gamma 1; see the module docstring)."""

  name: str = "pai"
  alpha: float = 0.2
  gamma: float = 1.1
  plausibility: float = 0.1
  layers: tuple[int, int] | None = (2, 32)
  layer_ref: int | None = 32
  use_cfg: bool = True
  official_prefill: bool = False

  def __post_init__(self):
    check_number("PAIConfig", "alpha", self.alpha, lo=0.0)
    check_number("PAIConfig", "gamma", self.gamma, lo=0.0)
    check_number("PAIConfig", "plausibility", self.plausibility, lo=0.0, hi=1.0, lo_open=True)
    check_bool("PAIConfig", "use_cfg", self.use_cfg)
    check_bool("PAIConfig", "official_prefill", self.official_prefill)
    _check_range("PAIConfig", "layers", self.layers, self.layer_ref)
    if self.layers is not None:
      object.__setattr__(self, "layers", (int(self.layers[0]), int(self.layers[1])))

  def compile(self, model_config) -> CompiledMethod:
    nl = int(getattr(model_config, "text", model_config).num_hidden_layers)
    start, stop = scale_layer_range(self.layers, nl, self.layer_ref)
    if stop > nl:
      raise ValueError(f"PAIConfig.layers={list(self.layers)} is outside the model's {nl} layers")
    on = np.zeros(nl, np.float32)
    # Official: CFGLogits never clears `use_cfg` when gamma is 1, so the amplification never runs.
    on[start:stop] = 0.0 if self.official_prefill and self.use_cfg and self.gamma == 1 else 1.0
    f = lambda x: jnp.asarray(x, jnp.float32)
    prefill = None if not self.official_prefill else f(0.0 if self.use_cfg else 1.0)
    values = PAIValues(alpha=f(self.alpha), gamma=f(self.gamma), plausibility=f(self.plausibility),
                       layers=jnp.asarray(on), prefill=prefill)
    return CompiledMethod(plan=PAIPlan(num_views=2 if self.use_cfg else 1), values=values)


def _check_range(owner: str, field: str, r, ref) -> None:
  if ref is not None:  # the depth the range is written for (scaled to the model's); checked first, by name
    check_int(owner, "layer_ref", ref, lo=1)
  if r is None:
    return
  ok = isinstance(r, (tuple, list)) and len(r) == 2
  ok = ok and all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in r)
  if not ok:
    raise ValueError(f"{owner}.{field} must be a (start, stop) pair of ints or None, got {r!r}")
  if r[0] < 0 or r[1] <= r[0] or (ref is not None and r[1] > ref):
    bound = f"<= {ref}" if ref is not None else "inside the model"
    raise ValueError(f"{owner}.{field}={list(r)} must satisfy 0 <= start < stop {bound}")


register("pai", lambda **kw: PAIConfig(**kw),
         "PAI: image-attention amplification + refinement against the text-only view (alpha 0.2, gamma 1.1)")
