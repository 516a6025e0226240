"""Sharded inference: a (data, model) device mesh and Megatron-style tensor-parallel shardings of the params.

Megatron split (per tensor, transformers' [out, in] layout): the projections that fan out (q/k/v, gate/up, CLIP
q/k/v and fc1, the projector's first layer, the vocabulary of embed/lm_head) are split along their output rows
("column parallel"), the projections that fan back in (o_proj, down_proj, CLIP out_proj and fc2, the projector's
second layer) along their input columns ("row parallel"). Attention heads therefore live on the model axis;
everything else (norms, biases of row-parallel layers, the newline vector) is replicated. The batch is split
over the data axis. XLA's SPMD partitioner inserts the collectives, so every AIR op (including those that mix
heads, e.g. the qk_rescale mean over heads) and head_gate compute exactly what they compute on one device.

A dimension is only split when the model axis divides it; otherwise that tensor is replicated (correct, just
not memory-saving). The rules come from the family (`Family.partition_rules`), so shared code stays
family-agnostic.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA, MODEL = "data", "model"


def make_mesh(model: int | None = None, data: int | None = None, devices: Sequence | None = None) -> Mesh:
  """A (data, model) mesh over `devices` (default: all local devices); model * data must equal their number.

  model defaults to all devices (pure tensor parallelism); data to the rest.
  """
  devices = list(devices) if devices is not None else jax.local_devices()
  n = len(devices)
  if model is None and data is None:
    model = n
  if model is None:
    model = n // data
  if data is None:
    data = n // model
  if model < 1 or data < 1 or model * data != n:
    raise ValueError(f"a ({data}, {model}) (data, model) mesh needs {max(model * data, 1)} devices; "
                     f"{n} are available")
  return Mesh(np.asarray(devices).reshape(data, model), (DATA, MODEL))


def path_names(key_path) -> tuple[str, ...]:
  """A jax key path -> its names (dict keys; list/tuple indices as digits, e.g. InstructBLIP's Q-Former layers)."""
  out = []
  for k in key_path:
    if isinstance(k, jax.tree_util.DictKey):
      out.append(str(k.key))
    elif isinstance(k, jax.tree_util.SequenceKey):
      out.append(str(k.idx))
    else:
      out.append(str(getattr(k, "name", k)))
  return tuple(out)


def spec_for(rules, parts: tuple, shape: tuple, model_size: int) -> PartitionSpec:
  """The PartitionSpec of the param at `parts` (names) with `shape`, from the family's rules.

  Rules give the spec of the per-layer tensor; stacked decoder/encoder params ("layers" in the path, not followed
  by a layer index as in a tuple of per-layer trees) get a leading None for the layer axis. Dimensions the model
  axis does not divide are not split.
  """
  name = ".".join(parts)
  stacked = any(p == "layers" and not (i + 1 < len(parts) and parts[i + 1].isdigit()) for i, p in enumerate(parts))
  for pattern, spec in rules:
    if re.search(pattern, name):
      spec = tuple(spec)
      if stacked:
        spec = (None,) + spec
      spec = spec + (None,) * (len(shape) - len(spec))
      spec = tuple(s if s is None or shape[i] % model_size == 0 else None for i, s in enumerate(spec))
      return PartitionSpec(*spec)
  return PartitionSpec()


def param_shardings(config, mesh: Mesh):
  """A function (param parts, shape) -> NamedSharding for `convert.checkpoint.load_params(sharding=...)`."""
  from models.family import family_of

  rules = family_of(config).partition_rules(config)
  model_size = mesh.shape[MODEL] if MODEL in mesh.shape else 1
  return lambda parts, shape: NamedSharding(mesh, spec_for(rules, parts, shape, model_size))


def shard_params(params, config, mesh: Mesh):
  """Places an existing param tree onto the mesh with the family's shardings."""
  fn = param_shardings(config, mesh)

  def put(kp, x):
    return jax.device_put(x, fn(path_names(kp), tuple(x.shape)))

  return jax.tree_util.tree_map_with_path(put, params)


def params_mesh(params) -> Mesh | None:
  """The (data, model) mesh the params live on, if they were loaded sharded."""
  for x in jax.tree.leaves(params):
    s = getattr(x, "sharding", None)
    if isinstance(s, NamedSharding) and MODEL in s.mesh.axis_names and DATA in s.mesh.axis_names:
      return s.mesh
  return None


def per_device_bytes(shape: tuple, itemsize: int, spec: PartitionSpec, mesh_shape: dict) -> int:
  """Bytes of one device's shard of a tensor (no devices needed; dims split by their mesh axes)."""
  n = 1
  for i, dim in enumerate(shape):
    axes = spec[i] if i < len(spec) else None
    split = 1
    for a in (axes if isinstance(axes, tuple) else (axes,)):
      if a is not None:
        split *= mesh_shape[a]
    n *= math.ceil(dim / split)
  return n * itemsize
