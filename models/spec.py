"""`RectificationSpec`: the arrays-only pytree that attention interventions read, and the context they see.

Every leaf of a spec has a leading layer axis L (e.g. `head_gate[L, H]`); the decoder scans over layers and
hands each layer its slice. Specs hold arrays only (no Python flags), so `jax.vmap` maps over a batch of specs
and one compiled graph serves baseline and intervention. A neutral spec is exactly the identity.

Op groups other than `head_gate` are optional sub-pytrees: `None` means "not compiled in" (a static property
of the pytree structure), an all-zero mask means "compiled in but neutral".
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class AttnContext:
  """What an intervention may read about the current attention call (per layer, per chunk).

  Shapes: B batch, T query rows in this chunk, S key slots.
    key_segments   [B, S] int32, models.segments ids (PAD for padding / unwritten cache slots)
    query_segments [B, T] int32
    mask           [B, T, S] bool, key visible to query (causal and not padding)
    query_slot     [T] int32, the key slot that holds each query row (the diagonal of the square part)
    prefill        static bool: True when the chunk is the prompt (T rows), False for one decoding row
  """

  key_segments: jax.Array
  query_segments: jax.Array
  mask: jax.Array
  query_slot: jax.Array
  prefill: bool = flax.struct.field(pytree_node=False, default=True)

  @property
  def last_row(self) -> jax.Array:
    """[T] bool: the chunk's last query row (the last prompt row in prefill, the current row in decoding)."""
    t = self.query_slot.shape[0]
    return jnp.arange(t) == t - 1


# ----------------------------------------------------------------------------------------------------------------
# AIR op groups (see models.rectify for the exact semantics). Every leaf leads with the layer axis L; masks are
# float 0/1 arrays [L, H] (1 = the op edits this head in this layer), scalars are [L] float arrays, switches are
# [L] float 0/1 arrays. Row rule shared by all groups: a query row is edited when it is a real (non-PAD) row and
#   (last_row_only == 0 or it is ctx.last_row) and (text_rows_only == 0 or its query segment is TEXT).
# ----------------------------------------------------------------------------------------------------------------


@flax.struct.dataclass
class QKRescaleOp:
  """Site `scores`: spectral-energy rescale of each head's logits towards the mean energy over heads.

  factor = clip(sqrt(target_scale * mean_h(E_h) / (E_h + eps)), clamp_lo, clamp_hi); E_h is the squared norm of
  the row's logits over visible keys (default) or of the whole [T, written keys] block (official_compat = 1).
  """

  heads: jax.Array  # [L, H]
  clamp_lo: jax.Array  # [L]
  clamp_hi: jax.Array  # [L]
  target_scale: jax.Array  # [L]
  last_row_only: jax.Array  # [L] 0/1
  text_rows_only: jax.Array  # [L] 0/1
  causal_block: jax.Array | None = None  # [L] 0/1: E_h over the causal block of rows <= i (None: 0, the row)
  official_compat: jax.Array | None = None  # [L] 0/1 (None: 0, and the official branch is not traced)


@flax.struct.dataclass
class RebalanceOp:
  """Site `scores`: image-key logits times image_gain (g), system-key logits times system_gain (d)."""

  heads: jax.Array  # [L, H]
  image_gain: jax.Array  # [L]
  system_gain: jax.Array  # [L]
  last_row_only: jax.Array  # [L] 0/1
  text_rows_only: jax.Array  # [L] 0/1


@flax.struct.dataclass
class LensOp:
  """Site `scores`: visible image-key logits += alpha * mean over all heads of |image-key logits|."""

  heads: jax.Array  # [L, H]
  alpha: jax.Array  # [L]
  last_row_only: jax.Array  # [L] 0/1
  text_rows_only: jax.Array  # [L] 0/1


@flax.struct.dataclass
class ADHHOp:
  """Site `pattern`: zero a row's text-key weights when its text mass >= threshold (no renormalisation).

  batch_sum = 1 reproduces the official trigger (text mass summed over the batch); 0 = per example.
  """

  heads: jax.Array  # [L, H]
  threshold: jax.Array  # [L]
  batch_sum: jax.Array  # [L] 0/1
  last_row_only: jax.Array  # [L] 0/1
  text_rows_only: jax.Array  # [L] 0/1


@flax.struct.dataclass
class ReallocOp:
  """Site `pattern`: if text mass > tau_text, image weights *= visual_factor (lambda), text *= text_factor (gamma)."""

  heads: jax.Array  # [L, H]
  tau_text: jax.Array  # [L]
  visual_factor: jax.Array  # [L]
  text_factor: jax.Array  # [L]
  renormalize: jax.Array  # [L] 0/1
  last_row_only: jax.Array  # [L] 0/1
  text_rows_only: jax.Array  # [L] 0/1


@flax.struct.dataclass
class ProjectionOp:
  """Site `pattern`: variance-constrained projection (zero-trace + Frobenius rescale in prefill, then shrinkage).

  official_compat = 1 reproduces the official code, including its future leak (see models.rectify).
  """

  heads: jax.Array  # [L, H]
  beta: jax.Array  # [L]
  last_row_only: jax.Array  # [L] 0/1
  text_rows_only: jax.Array  # [L] 0/1
  energy_rescale: jax.Array | None = None  # [L] 0/1: steps (b)-(c) keep the Frobenius energy (None: 0, the mass)
  official_compat: jax.Array | None = None  # [L] 0/1 (None: 0, and the official branch is not traced)


@flax.struct.dataclass
class AIROps:
  """The op groups of `RectificationSpec.ops`; a `None` group is not compiled in.

  Order of application: scores site qk_rescale -> rebalance -> lens (then mask + softmax in the model);
  pattern site adhh -> realloc -> projection.
  """

  qk_rescale: QKRescaleOp | None = None
  rebalance: RebalanceOp | None = None
  lens: LensOp | None = None
  adhh: ADHHOp | None = None
  realloc: ReallocOp | None = None
  projection: ProjectionOp | None = None


@flax.struct.dataclass
class RectificationSpec:
  """Per-layer intervention arrays. `head_gate[L, H]` multiplies each head's output `z` (0 ablates it).

  `ops` is None or an `AIROps` of optional op groups (see models.rectify); each group's leaves also lead with L.
  `extra` holds method-contributed ops (a tuple, empty by default; see models.attention for the hooks).
  """

  head_gate: jax.Array
  ops: Any = None
  # Ops contributed by decoding methods (air_jax.methods), applied after the AIR ops of each site. Each is a pytree
  # whose leaves lead with L and that may define edit_scores / edit_masked / edit_pattern (see models.attention).
  extra: tuple = ()

  @property
  def num_layers(self) -> int:
    return self.head_gate.shape[-2]


def neutral_spec(num_layers: int, num_heads: int, dtype=jnp.float32) -> RectificationSpec:
  """The identity spec: every head kept, no op compiled in."""
  return RectificationSpec(head_gate=jnp.ones((num_layers, num_heads), dtype))


def layer_slice(spec: RectificationSpec | None, layer: int) -> RectificationSpec | None:
  """The spec of one layer (leading axis removed)."""
  return None if spec is None else jax.tree.map(lambda x: x[layer], spec)
