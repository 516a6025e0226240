"""`AIRConfig`: the user-facing, validated hyperparameters of AIR, AIR* and AD-HH, compiled to a RectificationSpec.

Presets (`AIRConfig.preset(name, heads=..., **overrides)`):
  "air"       the paper's AIR: modality-balanced reallocation (tau_text 0.3, lambda 3.5, gamma 0.1, renormalised)
              + variance-constrained projection (QK spectral rescale, zero-trace, Frobenius rescale, shrinkage
              beta 0.3) on the hallucination-sensitive heads, last query row (the last prompt row in prefill and
              the current row in decoding).
  "air_star"  the official code's AIR*, steps in order: QK spectral rescale (off; layers [5, 18)), logit modality
              rebalance (layers [9, 15), all heads, g 1.08, d 0.97, query rows after the image), cross-head visual
              lens (layers [5, 18), all heads, alpha 0.28, last row), softmax, conditional AD-HH (sensitive heads,
              threshold 0.4 as in the official decoding script, last row), variance projection (layers [5, 18),
              all heads, beta 0.1, every row; zero-trace + rescale in prefill only).
  "adhh"      conditional AD-HH alone on the sensitive heads, threshold 0.5 (the AD-HH setting the paper uses).

Readings of the `air` preset's variance-constrained projection (the paper gives formulas for whole matrices; a
causal decoder edits one row at a time). Each choice below is the default; the alternative is one field away:
  (a) QK spectral rescale, factor sqrt(mean_heads(E) / E_h) per head:
      - clamp: `qk_clamp` = (0.8, 1.25), the official code's bounds (its comment: wider factors collapse the
        softmax into empty generations); the paper states no clamp: `qk_clamp=None` applies the factor unclamped.
      - energy E_h: `qk_energy` = "row", the squared logits of the edited row over its visible keys (in decoding this
        is exactly the official block, which is then one row); "block": of every real row j <= i (the head's
        causal logit block, prefill). `official_compat` uses the official whole block, future rows included.
  (b) zero-trace: the self weight of the row loses the causal block's trace / L (clipped at 0), in prefill only;
      decoding rows have no square block, as in the official code.
  (c) rescale: `projection_rescale` = "mass", the row is scaled back to its mass (it stays a distribution);
      "energy": scaled to keep the Frobenius energy of the truncated causal block (the formula's literal reading;
      rows stop being distributions).
  (d) shrinkage towards the row's mean over its visible keys (uniform), beta = 0.3; `official_compat` shrinks
      towards the whole matrix's mean, masked entries included.
  The projection edits the last query row (`projection_rows` = "last": the last prompt row and every decoding
  row); "all" edits every row (causal either way).

Sensitive heads: `heads` is a list of (layer, head) pairs, a path to a heads file in the official JSON format
`{"hal_heads": [[layer, head], ...], "non_hal_heads": [...]}` (its `hal_heads` are used), or the string "all"
(every head of every layer counts as sensitive: meant for experiments and tiny test models). An enabled op that
targets sensitive heads without `heads` is an error: there is no silent default head list (the official top-20
LLaVA-1.5-7B heads are available as `LLAVA15_7B_HAL_HEADS`).

Layer ranges are half-open [start, stop). With `layer_ref` = 32 (default) they are written for a 32-layer model
(LLaVA-1.5-7B, where the official ranges come from) and scaled to a model with L layers at compile time:
start' = floor(start * L / 32 + 0.5), stop' = max(floor(stop * L / 32 + 0.5), start' + 1), capped at L, so that a
non-empty range stays non-empty (a 2-layer model runs [5, 18) as [0, 1) and [9, 15) as [1, 2)). With
`layer_ref=None` ranges are absolute layer indices and must lie inside the model. `None` as a range = all layers.

Row rules: "last" (ctx.last_row), "text" (query rows whose segment is text, i.e. after the image), "all" (every
real row). `official_compat=True` reproduces the official code where it differs from the defaults here: the QK
rescale energy over the whole block, the AD-HH trigger summed over the batch, and the projection's whole-matrix
statistics with its future leak (see models.rectify).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Iterable, Sequence

import jax.numpy as jnp
import numpy as np

from air_jax.atomic import atomic_write_json
from models.spec import (AIROps, ADHHOp, LensOp, ProjectionOp, QKRescaleOp, ReallocOp, RebalanceOp,
                         RectificationSpec)

PRESETS = ("air", "air_star", "adhh")
ROW_RULES = ("last", "text", "all")
HEAD_TARGETS = ("all", "sensitive")
REF_LAYERS = 32

# Official top-20 hallucination heads of liuhaotian/llava-v1.5-7b (layer, head), from the AIR repository.
LLAVA15_7B_HAL_HEADS = (
    (16, 29), (26, 9), (13, 31), (15, 10), (20, 12), (30, 9), (19, 18), (17, 0), (18, 9), (26, 28),
    (19, 27), (18, 26), (15, 25), (14, 16), (31, 26), (15, 24), (31, 3), (22, 20), (27, 29), (17, 28),
)

# Official top-35 hallucination heads of liuhaotian/llava-v1.5-13b (layer, head), from the AIR repository's
# eval_scripts/eval_pope_air.py (the list its CHAIR/POPE runs of the 13B model use).
LLAVA15_13B_HAL_HEADS = (
    (0, 8), (29, 27), (23, 18), (20, 11), (36, 26), (19, 37), (22, 16), (22, 34), (21, 31), (20, 34),
    (37, 11), (17, 25), (35, 10), (17, 5), (15, 26), (0, 22), (19, 5), (19, 0), (14, 1), (23, 20),
    (21, 6), (30, 24), (26, 27), (21, 32), (15, 28), (15, 31), (19, 30), (20, 8), (19, 14), (14, 9),
    (39, 26), (25, 1), (18, 32), (17, 27), (39, 32),
)

Heads = tuple[tuple[int, int], ...]
LayerRange = tuple[int, int] | None


def _pairs(value: Any, where: str) -> Heads:
  """Validates a list of (layer, head) pairs; errors name `where`."""
  if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
    raise ValueError(f"{where}: expected a list of [layer, head] pairs, got {value!r}")
  out = []
  for item in value:
    if isinstance(item, np.ndarray) and item.ndim == 1:  # rows of a numpy array of pairs (e.g. np.argwhere)
      item = tuple(item.tolist())
    ok = isinstance(item, (list, tuple)) and len(item) == 2
    ok = ok and all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in item)
    if not ok:
      raise ValueError(f"{where}: entry {item!r} is not a [layer, head] pair of ints")
    if item[0] < 0 or item[1] < 0:
      raise ValueError(f"{where}: entry {list(item)} has a negative index")
    out.append((int(item[0]), int(item[1])))
  seen = set()
  for pair in out:
    if pair in seen:
      raise ValueError(f"{where}: duplicate head {list(pair)}")
    seen.add(pair)
  return tuple(out)


def read_heads_file(path: str | os.PathLike, key: str = "hal_heads", top_k: int | None = None) -> Heads:
  """Reads (layer, head) pairs from an official heads file (`{"hal_heads": [...], "non_hal_heads": [...]}`).

  Args:
    path: the JSON file.
    key: "hal_heads" (default) or "non_hal_heads".
    top_k: keep the first k pairs (files list heads by rank); None keeps all.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"heads file {path} does not exist")
  with open(path) as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"heads file {path} is not valid JSON: {e}") from e
  if not isinstance(data, dict) or key not in data:
    raise ValueError(f"heads file {path} has no key {key!r} (expected {{\"hal_heads\": [[layer, head], ...]}})")
  heads = _pairs(data[key], f"heads file {path}, key {key!r}")
  if top_k is not None:
    if top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {top_k}")
    heads = heads[:top_k]
  return heads


def write_heads_file(path: str | os.PathLike, hal_heads: Sequence, non_hal_heads: Sequence = ()) -> None:
  """Writes the official heads-file JSON atomically (temp file + rename)."""
  path = os.fspath(path)
  data = {"hal_heads": [list(p) for p in _pairs(hal_heads, "hal_heads")],
          "non_hal_heads": [list(p) for p in _pairs(non_hal_heads, "non_hal_heads")]}
  atomic_write_json(path, data, newline=True)


def scale_layer_range(layer_range: LayerRange, num_layers: int, layer_ref: int | None) -> tuple[int, int]:
  """The [start, stop) a range means for a model with num_layers layers (see the module docstring)."""
  if layer_range is None:
    return 0, num_layers
  start, stop = layer_range
  if layer_ref is None:
    return start, stop
  s = math.floor(start * num_layers / layer_ref + 0.5)
  e = math.floor(stop * num_layers / layer_ref + 0.5)
  s = min(s, num_layers - 1)
  return s, min(max(e, s + 1), num_layers)


@dataclasses.dataclass(frozen=True)
class AIRConfig:
  """Hyperparameters of the attention interventions; every op can be switched on or off independently.

  Per op: `<op>` (bool) enables it, `<op>_layers` is its layer range, `<op>_heads` is "all" or "sensitive",
  `<op>_rows` is its row rule. Greek letters of the paper: tau_text = tau_text, visual_factor = lambda,
  text_factor = gamma, beta = beta; of the official code: image_gain = g, system_gain = d, lens_alpha = alpha.
  """

  name: str = "custom"
  heads: Heads | str | None = None
  layer_ref: int | None = REF_LAYERS
  official_compat: bool = False
  # QK spectral-energy rescale (scores).
  qk_rescale: bool = False
  qk_clamp: tuple[float, float] | None = (0.8, 1.25)  # None: unclamped (the paper's formula)
  qk_energy: str = "row"  # "row" | "block" (causal block of rows <= i); see the module docstring
  qk_target_scale: float = 1.0
  qk_layers: LayerRange = (5, 18)
  qk_heads: str = "all"
  qk_rows: str = "all"
  # Logit modality rebalance (scores).
  rebalance: bool = False
  image_gain: float = 1.08
  system_gain: float = 0.97
  rebalance_layers: LayerRange = (9, 15)
  rebalance_heads: str = "all"
  rebalance_rows: str = "text"
  # Cross-head visual lens (scores).
  lens: bool = False
  lens_alpha: float = 0.28
  lens_layers: LayerRange = (5, 18)
  lens_heads: str = "all"
  lens_rows: str = "last"
  # Conditional AD-HH (pattern).
  adhh: bool = False
  adhh_threshold: float = 0.4
  adhh_layers: LayerRange = None
  adhh_heads: str = "sensitive"
  adhh_rows: str = "last"
  # Modality-balanced reallocation (pattern).
  realloc: bool = False
  tau_text: float = 0.3
  visual_factor: float = 3.5
  text_factor: float = 0.1
  renormalize: bool = True
  realloc_layers: LayerRange = None
  realloc_heads: str = "sensitive"
  realloc_rows: str = "last"
  # Variance-constrained projection (pattern).
  projection: bool = False
  beta: float = 0.3
  projection_layers: LayerRange = (5, 18)
  projection_heads: str = "all"
  projection_rows: str = "all"
  projection_rescale: str = "mass"  # "mass" (rows stay distributions) | "energy" (keep the causal block's energy)

  _OPS = ("qk", "rebalance", "lens", "adhh", "realloc", "projection")
  _ENABLE = {"qk": "qk_rescale"}

  def __post_init__(self):
    heads = self.heads
    if isinstance(heads, (str, os.PathLike)) and heads != "all":
      heads = read_heads_file(heads)
    elif heads is not None and not (isinstance(heads, str) and heads == "all"):
      heads = _pairs(heads, "AIRConfig.heads")
    object.__setattr__(self, "heads", heads)
    self._validate()
    # Lists given by users become tuples so that configs stay hashable.
    if self.qk_clamp is not None:
      object.__setattr__(self, "qk_clamp", tuple(float(x) for x in self.qk_clamp))
    for op in self._OPS:
      r = getattr(self, f"{op}_layers")
      if r is not None:
        object.__setattr__(self, f"{op}_layers", (int(r[0]), int(r[1])))

  # -- validation --------------------------------------------------------------------------------------------

  def _validate(self) -> None:
    def number(field: str, lo: float | None = 0.0, hi: float | None = None) -> None:
      v = getattr(self, field)
      if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) or not math.isfinite(v):
        raise ValueError(f"AIRConfig.{field} must be a finite number, got {v!r}")
      if lo is not None and v < lo:
        raise ValueError(f"AIRConfig.{field} must be >= {lo}, got {v!r}")
      if hi is not None and v > hi:
        raise ValueError(f"AIRConfig.{field} must be <= {hi}, got {v!r}")

    number("beta", 0.0, 1.0)
    number("tau_text", 0.0, 1.0)
    for f in ("visual_factor", "text_factor", "image_gain", "system_gain", "lens_alpha", "qk_target_scale",
              "adhh_threshold"):
      number(f)
    clamp = (0.0, math.inf) if self.qk_clamp is None else self.qk_clamp
    if not (isinstance(clamp, (tuple, list)) and len(clamp) == 2):
      raise ValueError(f"AIRConfig.qk_clamp must be a (lo, hi) pair, got {clamp!r}")
    lo, hi = clamp
    finite = clamp if self.qk_clamp is not None else ()
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in finite):
      raise ValueError(f"AIRConfig.qk_clamp must hold finite numbers, got {clamp!r}")
    if lo < 0 or hi < lo:
      raise ValueError(f"AIRConfig.qk_clamp must satisfy 0 <= lo <= hi, got {clamp!r}")
    for f, allowed in (("qk_energy", ("row", "block")), ("projection_rescale", ("mass", "energy"))):
      if getattr(self, f) not in allowed:
        raise ValueError(f"AIRConfig.{f} must be one of {allowed}, got {getattr(self, f)!r}")
    for f in ("official_compat", "renormalize") + tuple(self._enable(op) for op in self._OPS):
      if not isinstance(getattr(self, f), bool):
        raise ValueError(f"AIRConfig.{f} must be a bool, got {getattr(self, f)!r}")
    ref = self.layer_ref
    if ref is not None and (isinstance(ref, bool) or not isinstance(ref, int) or ref < 1):
      raise ValueError(f"AIRConfig.layer_ref must be a positive int or None, got {ref!r}")
    for op in self._OPS:
      rows, target, rng = f"{op}_rows", f"{op}_heads", f"{op}_layers"
      if getattr(self, rows) not in ROW_RULES:
        raise ValueError(f"AIRConfig.{rows} must be one of {ROW_RULES}, got {getattr(self, rows)!r}")
      if getattr(self, target) not in HEAD_TARGETS:
        raise ValueError(f"AIRConfig.{target} must be one of {HEAD_TARGETS}, got {getattr(self, target)!r}")
      self._check_range(rng, ref)
      if getattr(self, self._enable(op)) and getattr(self, target) == "sensitive" and not self.heads:
        # An empty list would silently run plain decoding under the method's name.
        what = "is required" if self.heads is None else "is empty"
        raise ValueError(
            f"AIRConfig.heads {what}: {self._enable(op)} is on and targets the sensitive heads "
            f"({target}='sensitive') of preset {self.name!r}; pass heads=[(layer, head), ...], a heads file path "
            "with a non-empty 'hal_heads' list, or heads='all'")

  def _check_range(self, field: str, limit: int | None) -> None:
    r = getattr(self, field)
    if r is None:
      return
    ok = isinstance(r, (tuple, list)) and len(r) == 2
    ok = ok and all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in r)
    if not ok:
      raise ValueError(f"AIRConfig.{field} must be a (start, stop) pair of ints or None, got {r!r}")
    start, stop = r
    if start < 0 or stop <= start or (limit is not None and stop > limit):
      bound = f"<= {limit}" if limit is not None else "inside the model"
      raise ValueError(f"AIRConfig.{field}={list(r)} must satisfy 0 <= start < stop {bound}")

  @classmethod
  def _enable(cls, op: str) -> str:
    return cls._ENABLE.get(op, op)

  # -- presets -----------------------------------------------------------------------------------------------

  @classmethod
  def preset(cls, name: str, heads: Any = None, **overrides) -> "AIRConfig":
    """A preset ("air", "air_star", "adhh") with optional field overrides (see the module docstring)."""
    if name == "air":
      base = dict(realloc=True, projection=True, qk_rescale=True, beta=0.3, qk_heads="sensitive", qk_rows="last",
                  qk_layers=None, projection_heads="sensitive", projection_rows="last", projection_layers=None)
    elif name == "air_star":
      base = dict(qk_rescale=False, rebalance=True, lens=True, adhh=True, adhh_threshold=0.4, projection=True,
                  beta=0.1, projection_heads="all", projection_rows="all", projection_layers=(5, 18))
    elif name == "adhh":
      base = dict(adhh=True, adhh_threshold=0.5)
    else:
      raise ValueError(f"unknown AIR preset {name!r}; expected one of {PRESETS}")
    fields = {f.name for f in dataclasses.fields(cls)}
    for key in overrides:
      if key not in fields or key == "name":
        raise ValueError(f"unknown AIRConfig field {key!r} in overrides of preset {name!r}")
    base.update(overrides)
    return cls(name=name, heads=heads, **base)

  def replace(self, **changes) -> "AIRConfig":
    """A copy with fields changed (validated again)."""
    fields = {f.name for f in dataclasses.fields(self)}
    for key in changes:
      if key not in fields:
        raise ValueError(f"unknown AIRConfig field {key!r}")
    return dataclasses.replace(self, **changes)

  # -- compilation -------------------------------------------------------------------------------------------

  def layer_mask(self, field: str, num_layers: int) -> np.ndarray:
    """[L] bool: the layers an op's range selects in a model with num_layers layers."""
    start, stop = scale_layer_range(getattr(self, field), num_layers, self.layer_ref)
    if self.layer_ref is None and stop > num_layers:
      raise ValueError(f"AIRConfig.{field}={list(getattr(self, field))} is outside the model's {num_layers} layers")
    mask = np.zeros(num_layers, bool)
    mask[start:stop] = True
    return mask

  def sensitive_mask(self, num_layers: int, num_heads: int) -> np.ndarray:
    """[L, H] bool of the sensitive heads (all True for heads='all'); errors name out-of-range heads."""
    if self.heads == "all":
      return np.ones((num_layers, num_heads), bool)
    mask = np.zeros((num_layers, num_heads), bool)
    for layer, head in self.heads or ():
      if layer >= num_layers or head >= num_heads:
        raise ValueError(f"AIRConfig.heads: head [{layer}, {head}] is outside the model's {num_layers} layers x "
                         f"{num_heads} heads")
      mask[layer, head] = True
    return mask

  def compile(self, model_config, dtype=jnp.float32) -> RectificationSpec:
    """The RectificationSpec of this config for a model (any family's config, its `dims`, or a `TextConfig`).

    Disabled ops are left out (None: not compiled in); every leaf leads with the layer axis L.
    """
    text = getattr(model_config, "dims", model_config)
    n_layers, n_heads = int(text.num_hidden_layers), int(text.num_attention_heads)
    sensitive = self.sensitive_mask(n_layers, n_heads)

    def arr(x) -> jnp.ndarray:
      return jnp.asarray(np.asarray(x, np.float64), dtype)

    def per_layer(v) -> jnp.ndarray:
      return arr(np.full(n_layers, float(v)))

    def common(op: str) -> dict:
      target = getattr(self, f"{op}_heads")
      heads = sensitive if target == "sensitive" else np.ones((n_layers, n_heads), bool)
      heads = heads & self.layer_mask(f"{op}_layers", n_layers)[:, None]
      rows = getattr(self, f"{op}_rows")
      return dict(heads=arr(heads), last_row_only=per_layer(rows == "last"), text_rows_only=per_layer(rows == "text"))

    # The official branches are traced only when asked for (None: compiled out); batch_sum is one cheap select.
    compat = per_layer(1.0) if self.official_compat else None
    clamp = (0.0, math.inf) if self.qk_clamp is None else self.qk_clamp
    ops = AIROps(
        qk_rescale=QKRescaleOp(clamp_lo=per_layer(clamp[0]), clamp_hi=per_layer(clamp[1]),
                               target_scale=per_layer(self.qk_target_scale), official_compat=compat,
                               causal_block=per_layer(1.0) if self.qk_energy == "block" else None,
                               **common("qk")) if self.qk_rescale else None,
        rebalance=RebalanceOp(image_gain=per_layer(self.image_gain), system_gain=per_layer(self.system_gain),
                              **common("rebalance")) if self.rebalance else None,
        lens=LensOp(alpha=per_layer(self.lens_alpha), **common("lens")) if self.lens else None,
        adhh=ADHHOp(threshold=per_layer(self.adhh_threshold), batch_sum=per_layer(self.official_compat),
                    **common("adhh")) if self.adhh else None,
        realloc=ReallocOp(tau_text=per_layer(self.tau_text), visual_factor=per_layer(self.visual_factor),
                          text_factor=per_layer(self.text_factor), renormalize=per_layer(self.renormalize),
                          **common("realloc")) if self.realloc else None,
        projection=ProjectionOp(beta=per_layer(self.beta), official_compat=compat,
                                energy_rescale=per_layer(1.0) if self.projection_rescale == "energy" else None,
                                **common("projection")) if self.projection else None,
    )
    return RectificationSpec(head_gate=jnp.ones((n_layers, n_heads), dtype), ops=ops)
