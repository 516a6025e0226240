"""DoLa, Decoding by Contrasting Layers (Chuang et al., ICLR 2024; official code voidism/DoLa).

Early exits of the same pass (no extra rows): the decoder reads out the residual stream after each candidate
premature layer j (0 = the embeddings) through the LM head. Per step and example, with q_N the final (mature)
layer's distribution and q_j the premature ones (official `dola_greedy_decode` / `lm_score`):
  M_j = (q_N + q_j) / 2,  JSD_j = (KL(M_j || q_N) + KL(M_j || q_j)) / 2 (torch `F.kl_div(..).mean(-1)`, i.e.
  averaged over the vocabulary, which does not change the argmax),
  j* = argmax_j JSD_j (first on ties),
  d = log_softmax(l_N) - log_softmax(l_j*),
  d := relative_top_value (-1000, official `lm_score`; the official generation path gives -inf, the same
  greedy choice) where log q_N < max log q_N + log(relative_top),
then the repetition penalty (transformers' RepetitionPenaltyLogitsProcessor, over the prompt and the generated
tokens: d / p where d > 0, d * p where d < 0), then the sampler.

Preset "dola" (AIR supplementary C.1 and the DoLa README): the early-exit schedule [0, 2, 4, ..., 32] of a
32-layer model (the last entry, 32, is the mature layer; the others are the premature candidates), relative_top
0.1, repetition_penalty 1.2 (DoLa recommends 1.2 for open-ended generation). With `layer_ref` = 32 the schedule
is scaled to a model with L layers (j' = floor(j * L / 32 + 0.5), duplicates and the mature layer dropped).

Differences from the official code, switchable:
- `final_norm` (default True): the final RMSNorm is applied to early exits before the LM head, as the LM head
  was trained on normed states (the issue's definition). The official code (transformers-4.28.1 patch,
  `lm_head(outputs.hidden_states[layer])`) and transformers' `dola_layers` mode skip it for premature layers:
  `final_norm=False` reproduces them (with `relative_top_value=float("-inf")`, transformers' filter value).
- `batch_js` (default False): the premature layer is chosen per example. The official code averages JSD over
  the batch (`js_divs.mean(-1)`), one layer for the whole batch (it ran batch size 1): `batch_js=True`.
- Padding tokens are not penalised (the official code ran unpadded batches of one).
DoLa has no neutral setting (the contrast has no strength); `repetition_penalty=1` switches the penalty off.
"""

from __future__ import annotations

import dataclasses
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from air_jax.methods.base import CompiledMethod, ConfigMixin, Plan, ViewInputs, check_bool, check_int, check_number
from air_jax.methods.registry import register

DEFAULT_LAYERS = tuple(range(0, 33, 2))


@flax.struct.dataclass
class DoLaValues:
  relative_top: jax.Array
  relative_top_value: jax.Array
  repetition_penalty: jax.Array


@dataclasses.dataclass(frozen=True)
class DoLaPlan(Plan):
  batch_js: bool = False

  def couples_rows(self, values) -> bool:
    del values
    return self.batch_js  # the official premature layer is chosen on the JSD averaged over the batch

  def init_state(self, values, inputs: ViewInputs, config):
    b = inputs.input_ids.shape[0]
    vocab = config.dims.vocab_size
    ids = jnp.where(inputs.attention_mask.astype(bool), inputs.input_ids, vocab)  # padding -> dropped index
    seen = jnp.zeros((b, vocab), bool).at[jnp.arange(b)[:, None], ids].set(True, mode="drop")
    return seen

  def update_state(self, values, state, tokens):
    return state.at[jnp.arange(tokens.shape[0]), tokens].set(True, mode="drop")

  def combine(self, values: DoLaValues, logits, exit_logits, state):
    final = jax.nn.log_softmax(logits[0], axis=-1)  # [B, V]
    prem = jax.nn.log_softmax(exit_logits, axis=-1)  # [K, B, V]
    m = 0.5 * (jnp.exp(final)[None] + jnp.exp(prem))
    log_m = jnp.log(m)
    kl1 = jnp.mean(m * (log_m - final[None]), axis=-1)  # [K, B]
    kl2 = jnp.mean(m * (log_m - prem), axis=-1)
    js = 0.5 * (kl1 + kl2)
    if self.batch_js:
      js = jnp.broadcast_to(jnp.mean(js, axis=1, keepdims=True), js.shape)
    pick = jnp.argmax(js, axis=0)  # [B]
    base = jnp.take_along_axis(prem, pick[None, :, None], axis=0)[0]
    diff = final - base
    top = jnp.max(final, axis=-1, keepdims=True) + jnp.log(values.relative_top)
    diff = jnp.where(final < top, values.relative_top_value, diff)
    p = values.repetition_penalty
    penalised = jnp.where(diff < 0, diff * p, diff / p)
    return jnp.where(state, penalised, diff)


def premature_layers(layers, num_layers: int, layer_ref: int | None) -> tuple[int, ...]:
  """The candidate premature layers of a schedule (last entry = mature) for a model with num_layers layers."""
  scale = (lambda j: int(math.floor(j * num_layers / layer_ref + 0.5))) if layer_ref else (lambda j: int(j))
  out = []
  for j in layers[:-1]:
    s = scale(j)
    if s != num_layers and s not in out:
      out.append(s)
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class DoLaConfig(ConfigMixin):
  """layers: early-exit schedule, ascending, last = mature (must be the final layer); relative_top in (0, 1];
  repetition_penalty > 0 (1 = off); relative_top_value: the filtered tokens' score; final_norm, batch_js: see
  the module docstring."""

  name: str = "dola"
  layers: tuple[int, ...] = DEFAULT_LAYERS
  layer_ref: int | None = 32
  relative_top: float = 0.1
  relative_top_value: float = -1000.0
  repetition_penalty: float = 1.2
  final_norm: bool = True
  batch_js: bool = False

  def __post_init__(self):
    check_number("DoLaConfig", "relative_top", self.relative_top, lo=0.0, hi=1.0, lo_open=True)
    check_number("DoLaConfig", "repetition_penalty", self.repetition_penalty, lo=0.0, lo_open=True)
    if self.relative_top_value != float("-inf"):  # -inf: transformers' filter value
      check_number("DoLaConfig", "relative_top_value", self.relative_top_value)
    check_bool("DoLaConfig", "final_norm", self.final_norm)
    check_bool("DoLaConfig", "batch_js", self.batch_js)
    ref = self.layer_ref
    if ref is not None:
      check_int("DoLaConfig", "layer_ref", ref, lo=1)
    ls = self.layers
    if isinstance(ls, (str, bytes)) or not hasattr(ls, "__iter__"):
      raise ValueError(f"DoLaConfig.layers must be a list of layer indices, got {ls!r}")
    ls = tuple(ls)
    if len(ls) < 2 or not all(isinstance(j, (int, np.integer)) and not isinstance(j, bool) for j in ls):
      raise ValueError(f"DoLaConfig.layers must hold >= 2 ints (premature candidates, then the mature layer), "
                       f"got {self.layers!r}")
    if any(b <= a for a, b in zip(ls, ls[1:])) or ls[0] < 0:
      raise ValueError(f"DoLaConfig.layers must be ascending and >= 0, got {list(ls)}")
    if ref is not None and ls[-1] != ref:
      raise ValueError(f"DoLaConfig.layers={list(ls)}: the last entry (the mature layer) must be the final layer "
                       f"{ref} of the layer_ref={ref}-layer reference model")
    object.__setattr__(self, "layers", tuple(int(j) for j in ls))

  def compile(self, model_config) -> CompiledMethod:
    nl = int(getattr(model_config, "text", model_config).num_hidden_layers)
    if self.layer_ref is None and self.layers[-1] != nl:
      raise ValueError(f"DoLaConfig.layers={list(self.layers)} does not fit this {nl}-layer model: the last entry "
                       f"(the mature layer) must be {nl}")
    cands = premature_layers(self.layers, nl, self.layer_ref)
    if not cands:
      raise ValueError(f"DoLaConfig.layers={list(self.layers)} leaves no premature layer in a {nl}-layer model")
    f = lambda x: jnp.asarray(x, jnp.float32)
    values = DoLaValues(relative_top=f(self.relative_top), relative_top_value=f(self.relative_top_value),
                        repetition_penalty=f(self.repetition_penalty))
    plan = DoLaPlan(early_exit_layers=cands, early_exit_norm=self.final_norm, batch_js=self.batch_js)
    return CompiledMethod(plan=plan, values=values)


register("dola", lambda **kw: DoLaConfig(**kw),
         "DoLa: contrast with the max-JSD early-exit layer ([0, 2, ..., 32], relative top 0.1, penalty 1.2)")
