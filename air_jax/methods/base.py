"""The decoding-method interface: what a method may contribute to the one compiled decoding loop.

Shape legend: B examples, V views per example, R = V * B model rows, T prompt length, S cache slots, K early
exits, Vocab vocabulary size, L layers.

A method has two parts.

1. A **config**: a frozen, validated dataclass (static, hashable), with `name`, `compile(model_config)` and
   `hyperparameters()` (the resolved values, JSON-ready, written into evaluation results). Bad values raise a
   `ValueError` naming the class, the field and the value. Presets come from the registry
   (`air_jax.methods.make(name, **overrides)`), each documented with its source in its file.
2. What `compile` returns: a `CompiledMethod(plan, values)`. `values` is a pytree of arrays (traced: `jax.vmap`
   sweeps and one compilation serve every value); `plan` is a small frozen dataclass (static: part of the jit
   cache key) holding only structure (number of views, early-exit layers, switches that change shapes) and the
   hooks below. A config whose `compile` returns a bare `RectificationSpec` (e.g. `AIRConfig`) is a spec-only
   method (`as_compiled` wraps it).

Hooks of a `Plan` (all optional; the defaults do nothing, so `Plan()` is plain decoding). Each is a pure JAX
function of `values` and arrays; none may branch in Python on a traced value.

  views(values, inputs, config) -> ViewInputs
      The model rows of one step. `inputs` holds the B examples (input_ids/attention_mask [B, T], pixel_values
      [I, C, H, W]); return R = num_views * B rows, view-major (rows [v*B, (v+1)*B) are view v; view 0 is the
      main view), all of length T, left padded, plus the pixel values of every image token in row-major order.
      Examples: VCD appends the same prompts with noised pixels; PAI appends the prompts without image tokens.
      Views run in the same prefill and the same decoding steps as the main rows (one batch), and every view
      is fed the token chosen for its example.
  spec(values, batch, config) -> RectificationSpec | None
      Attention edits for all R rows: AIR-style ops (`ops`) and method ops (`extra`, see models.attention:
      hooks `edit_scores`, `edit_masked` for mask changes such as attention registers, `edit_pattern`). An op
      that must touch only some views carries a per-row gate built here from `batch`.
  early_exit_layers / early_exit_norm (plan fields)
      Layers (0 = embeddings, L = last) whose residual stream the decoder reads out through the LM head (with
      the final norm when early_exit_norm) in the same pass; the combiner receives them for the main view.
  couples_rows(values) -> bool
      Whether a row's result depends on the other rows (a statistic over the batch); no filler rows are then
      added to its batches.
  init_state(values, inputs, config) -> state;  update_state(values, state, tokens [B]) -> state
      Per-example state carried through the loop (e.g. the tokens seen so far, for a repetition penalty).
  combine(values, logits [V, B, Vocab], exit_logits [K, B, Vocab] | None, state) -> [B, Vocab]
      The logits the sampler sees (greedy argmax, or temperature / top-k / top-p sampling). Contrast and
      adaptive-plausibility cut-offs live here.

The decoding loop (`air_jax.decoding.generate_tokens`) calls only these hooks: it never asks which method runs.
Adding a method = one file in this folder (config + plan + registry entry); no model or loop code changes.

Neutral settings must be exactly the identity (e.g. alpha = 0 equals plain greedy bit for bit), so the same
compiled graph serves baseline and intervention.

Search strategies: a plan whose class sets `searches = True` brings its own search, `search(values, params,
config, input_ids, attention_mask, pixel_values, *, max_new_tokens, eos_ids, pad_id) -> {"tokens", "num_tokens",
...}`, and `generate` calls it instead of the sampling loop (e.g. OPERA, air_jax.methods.opera: beam search with
roll-back in one compiled loop, air_jax.opera_search). Plain beam search for attention-only methods is
`generate(..., num_beams=K)` (air_jax.beam_search).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from models.spec import RectificationSpec


@flax.struct.dataclass
class ViewInputs:
  """Model rows: input_ids / attention_mask [R, T] int32 (left padded), pixel_values [I, C, H, W]."""

  input_ids: jax.Array
  attention_mask: jax.Array
  pixel_values: jax.Array | None


@dataclasses.dataclass(frozen=True)
class Plan:
  """The static part of a compiled method. The base class is plain decoding; methods subclass and override."""

  num_views: int = 1
  early_exit_layers: tuple[int, ...] = ()
  early_exit_norm: bool = True

  def views(self, values, inputs: ViewInputs, config) -> ViewInputs:
    del values, config
    return inputs

  def spec(self, values, batch: int, config) -> RectificationSpec | None:
    del values, batch, config
    return None

  def init_state(self, values, inputs: ViewInputs, config) -> Any:
    del values, inputs, config
    return ()

  def update_state(self, values, state, tokens: jax.Array) -> Any:
    del values, tokens
    return state

  def combine(self, values, logits: jax.Array, exit_logits: jax.Array | None, state) -> jax.Array:
    del values, exit_logits, state
    return logits[0]

  def couples_rows(self, values) -> bool:
    """True when a row's result depends on the other rows of its batch (a statistic over the batch, e.g. DoLa's
    batch-averaged JSD or the official AD-HH trigger): callers then must not add filler rows (device split,
    padded last batch), which would enter the statistic. `values` are concrete here."""
    del values
    return False

  # A plan with `searches = True` brings its own search (e.g. OPERA's beam search with roll-back): `generate`
  # then calls `search` instead of the sampling loop. Returns {"tokens": [B, N], "num_tokens": [B], ...}.
  searches = False

  def search(self, values, params, config, input_ids, attention_mask, pixel_values, *, max_new_tokens: int,
             eos_ids: tuple[int, ...], pad_id: int) -> dict:
    raise NotImplementedError(f"{type(self).__name__} does not bring its own search")


@dataclasses.dataclass(frozen=True)
class SpecPlan(Plan):
  """A spec-only method: `values` is the RectificationSpec, one view."""

  def spec(self, values, batch: int, config) -> RectificationSpec | None:
    del batch, config
    return values

  def couples_rows(self, values) -> bool:
    adhh = getattr(getattr(values, "ops", None), "adhh", None)  # the official trigger sums over the batch
    return adhh is not None and bool(np.any(np.asarray(adhh.batch_sum) > 0.5))


@flax.struct.dataclass
class CompiledMethod:
  """plan (static structure and hooks) + values (arrays). A pytree: jit-able, stackable, vmappable."""

  plan: Plan = flax.struct.field(pytree_node=False)
  values: Any = None


PLAIN = CompiledMethod(plan=Plan(), values=None)


def as_compiled(method, model_config) -> CompiledMethod:
  """None, a RectificationSpec, a method config or a CompiledMethod -> a CompiledMethod."""
  if method is None:
    return PLAIN
  if isinstance(method, CompiledMethod):
    return method
  if isinstance(method, RectificationSpec):
    return CompiledMethod(plan=SpecPlan(), values=method)
  if hasattr(method, "compile"):
    return as_compiled(method.compile(model_config), model_config)
  raise TypeError("a decoding method must be None, a method config (e.g. air_jax.methods.make('vcd')), an "
                  f"AIRConfig, a RectificationSpec or a CompiledMethod, not {type(method).__name__}")


def stack_methods(methods) -> CompiledMethod:
  """Stacks compiled methods of one plan and structure along a new leading sweep axis (for jax.vmap)."""
  structures = {jax.tree.structure(m) for m in methods}
  if len(structures) != 1:
    raise ValueError("the configs of a sweep must compile to one structure (same method, same ops switched on, "
                     f"same views and layers); got {len(structures)} different structures")
  return jax.tree.map(lambda *xs: jnp.stack(xs), *methods)


# -- shared validation --------------------------------------------------------------------------------------


def check_number(owner: str, field: str, value, *, lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False, hi_open: bool = False) -> float:
  """A finite number inside the given bounds, or a ValueError naming `owner.field` and the value."""
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
      or not math.isfinite(float(value)):
    raise ValueError(f"{owner}.{field} must be a finite number, got {value!r}")
  v = float(value)
  if lo is not None and (v <= lo if lo_open else v < lo):
    raise ValueError(f"{owner}.{field} must be {'>' if lo_open else '>='} {lo}, got {value!r}")
  if hi is not None and (v >= hi if hi_open else v > hi):
    raise ValueError(f"{owner}.{field} must be {'<' if hi_open else '<='} {hi}, got {value!r}")
  return v


def check_bool(owner: str, field: str, value) -> bool:
  """`value` if it is a bool, else a ValueError naming owner.field."""
  if not isinstance(value, bool):
    raise ValueError(f"{owner}.{field} must be a bool, got {value!r}")
  return value


def check_int(owner: str, field: str, value, *, lo: int | None = None, hi: int | None = None) -> int:
  """`value` if it is an int in [lo, hi], else a ValueError naming owner.field."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{owner}.{field} must be an int, got {value!r}")
  if (lo is not None and value < lo) or (hi is not None and value > hi):
    raise ValueError(f"{owner}.{field} must lie in [{lo}, {hi}], got {value!r}")
  return int(value)


class ConfigMixin:
  """`replace` (validated again) and `hyperparameters` for frozen dataclass configs."""

  def replace(self, **changes):
    fields = {f.name for f in dataclasses.fields(self)}
    for key in changes:
      if key not in fields:
        raise ValueError(f"unknown {type(self).__name__} field {key!r}; fields: {sorted(fields)}")
    return dataclasses.replace(self, **changes)

  def hyperparameters(self) -> dict:
    return to_jsonable(dataclasses.asdict(self))


def to_jsonable(x):
  """x with tuples, numpy values and other non-JSON leaves turned into JSON values (for results files)."""
  if isinstance(x, dict):
    return {str(k): to_jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [to_jsonable(v) for v in x]
  if isinstance(x, (np.integer, np.floating)):
    return x.item()
  return x


def hyperparameters(method_cfg) -> dict:
  """The resolved hyperparameters of any method config (for results files)."""
  if method_cfg is None:
    return {"method": "greedy"}
  if hasattr(method_cfg, "hyperparameters"):
    out = method_cfg.hyperparameters()
  elif dataclasses.is_dataclass(method_cfg):
    out = to_jsonable(dataclasses.asdict(method_cfg))
  else:
    out = {"repr": repr(method_cfg)}
  return {"class": type(method_cfg).__name__, **out}


# -- shared pieces of methods ---------------------------------------------------------------------------------


def below_plausibility(logits: jax.Array, beta) -> jax.Array:
  """[B, Vocab] bool: tokens under the adaptive plausibility cut-off log(beta) + max (VCD/PAI/DoLa style).

  Works on raw logits and on log-probabilities alike (the cut-off is relative to the row maximum).
  """
  return logits < jnp.log(beta) + jnp.max(logits, axis=-1, keepdims=True)


def per_view_rows(num_views: int, batch: int, views_on) -> jax.Array:
  """[R] float 0/1: rows of the views in `views_on` (a tuple of view indices)."""
  on = np.zeros((num_views, batch), np.float32)
  for v in views_on:
    on[v] = 1.0
  return jnp.asarray(on.reshape(-1))


def concat_views(*views: ViewInputs) -> ViewInputs:
  """View-major concatenation of several ViewInputs of the same T.

  Vision inputs are batch-first pytrees (one row per model row, whatever the family), concatenated leaf by leaf;
  a view without vision (None) reuses the first view's rows (its prompts hold no image token, so they are unused).
  """
  first = next((v.pixel_values for v in views if v.pixel_values is not None), None)
  pix = [v.pixel_values if v.pixel_values is not None else first for v in views]
  vision = None if first is None else jax.tree.map(lambda *xs: jnp.concatenate(xs), *pix)
  return ViewInputs(input_ids=jnp.concatenate([v.input_ids for v in views]),
                    attention_mask=jnp.concatenate([v.attention_mask for v in views]),
                    pixel_values=vision)


def image_positions(inputs: ViewInputs, config) -> jax.Array:
  """[R, T] bool: the image-feature positions of each row, from the family's key segments (any family)."""
  from models.family import family_of
  from models.segments import IMAGE

  return family_of(config).segments(config, inputs.input_ids, inputs.attention_mask) == IMAGE


def text_only_positions(inputs: ViewInputs, config) -> jax.Array:
  """[R, T] bool: the positions a view of the prompt without its image drops: the image-feature positions and,
  for families that frame each image run (`Family.wraps_images`), the start and end token around each run."""
  from models.family import family_of

  is_img = image_positions(inputs, config)
  if not family_of(config).wraps_images:
    return is_img
  before = jnp.pad(is_img[:, 1:], ((0, 0), (0, 1)))  # the slot just before an image token
  after = jnp.pad(is_img[:, :-1], ((0, 0), (1, 0)))  # the slot just after one
  return is_img | before | after


def without_image_tokens(inputs: ViewInputs, image_token_id: int | None = None, pad_id: int = 0, *,
                         is_image: jax.Array | None = None) -> ViewInputs:
  """The same prompts with every image token removed, left padded again to the same length T.

  Image positions: `is_image` [R, T] (e.g. `image_positions`, from the family's segments), or the ids equal to
  `image_token_id`. The rows keep their vision inputs (unused: no image token is left), so every view has one
  vision row per model row.
  """
  ids, mask = inputs.input_ids, inputs.attention_mask
  t = ids.shape[1]
  is_img = (ids == image_token_id) if is_image is None else is_image
  keep = mask.astype(bool) & ~is_img
  after = jnp.cumsum(keep[:, ::-1].astype(jnp.int32), axis=1)[:, ::-1]  # kept tokens at or after each slot
  dest = jnp.where(keep, t - after, t)  # kept tokens packed at the end; the rest go to a dropped slot t
  rows = jnp.arange(ids.shape[0])[:, None]
  new_ids = jnp.full((ids.shape[0], t + 1), pad_id, ids.dtype).at[rows, dest].set(ids)[:, :t]
  new_mask = jnp.zeros((ids.shape[0], t + 1), mask.dtype).at[rows, dest].set(jnp.ones_like(mask))[:, :t]
  return ViewInputs(input_ids=new_ids, attention_mask=new_mask, pixel_values=inputs.pixel_values)
