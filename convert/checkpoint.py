"""Any registered family's Hugging Face safetensors checkpoint -> air-jax params, validated, optionally streamed.

Two steps:
  1. `index_checkpoint` reads only the safetensors headers and maps every key through the family's key table
     (`Family.canonical_key`; per-layer keys `...layers.{i}.X` go to the stacked param `...layers.X`, slice i).
     It fails with one ValueError listing every unused key, unfilled parameter and shape mismatch.
  2. `load_params` materialises each parameter: as numpy arrays (no sharding), or straight onto devices with
     `jax.make_array_from_callback`, where each device's slice is read from the memory-mapped files on its own
     (a tensor-parallel shard reads only its rows/columns of every layer). The model is never held whole in host
     memory next to its device copy: at most one parameter (one device slice of it, when sharded) is in flight.
Pickle checkpoints are refused (see `checkpoint_files`).
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import re
from typing import Callable

import jax
import numpy as np

from convert.safetensors_io import SafetensorsFile
from models.params import is_shape

log = logging.getLogger(__name__)

_PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt")
_LAYER = re.compile(r"^(.*?\blayers)\.(\d+)\.(.*)$")


def checkpoint_files(path: str) -> list[str]:
  """The safetensors files of a checkpoint directory (sharded via its index, or all `*.safetensors`)."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict):
      raise ValueError(f"{index}: missing or invalid 'weight_map'")
    files = sorted({os.path.join(path, v) for v in weight_map.values()})
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
      raise FileNotFoundError(f"{index} names shard(s) that do not exist: {missing}")
    return files
  files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
  if files:
    return files
  pickles = sorted(p for pat in _PICKLE_PATTERNS for p in glob.glob(os.path.join(path, pat)))
  if pickles:
    raise ValueError(
        f"{path} holds only pickle-format weights ({', '.join(os.path.basename(p) for p in pickles)}); "
        "air-jax loads safetensors only, since unpickling can run arbitrary code. Convert the checkpoint to "
        "safetensors in a trusted environment (e.g. `model.save_pretrained(dir, safe_serialization=True)`)")
  raise FileNotFoundError(f"no *.safetensors weights in {path}")


def resolve_tied_head(path: str, config, family=None):
  """The config to load `path` with: a tied config is untied when the checkpoint stores an LM head that differs
  from the input embeddings (transformers keeps such a head and warns); otherwise `config` unchanged.

  Only the two tensors are read, and only when the config is tied and both are stored.
  """
  from models.family import _tied, family_of

  fam = family if family is not None else family_of(config)
  if not _tied(config):
    return config
  found: dict[str, tuple[str, str]] = {}
  for file in checkpoint_files(path):
    with SafetensorsFile(file) as st:
      for key in st.keys():
        role = fam.head_key_role(key)
        if role is not None:
          found[role] = (file, key)
  if len(found) < 2:
    return config

  def read(role):
    file, key = found[role]
    with SafetensorsFile(file) as st:
      return np.asarray(st.get(key))

  head, embed = read("head"), read("embed")
  if head.shape == embed.shape and np.array_equal(head, embed):
    return config
  log.warning("%s: the config ties the LM head to the input embeddings, but the checkpoint stores a different "
              "'%s'; it is used as stored (untied), as transformers does. Set \"tie_word_embeddings\": false in "
              "config.json to silence this.", path, found["head"][1])
  return fam.untie(config)




def _leaf(tree: dict, parts: list[str]):
  node = tree
  for p in parts:
    if not isinstance(node, dict) or p not in node:
      return None
    node = node[p]
  return node if isinstance(node, tuple) else None


def index_checkpoint(path: str, config, family=None):
  """(shapes tree, sources) where sources[param parts] = {layer or None: (file, key)}; validated.

  Raises:
    ValueError: naming every unused checkpoint key, unfilled parameter (and missing layers) and shape mismatch.
  """
  from models.family import family_of

  fam = family if family is not None else family_of(config)
  shapes = fam.param_shapes(config)
  sources: dict[tuple, dict] = {}
  unused, mismatched, duplicated = [], [], []
  for file in checkpoint_files(path):
    with SafetensorsFile(file) as st:
      for key in st.keys():
        if any(p.search(key) for p in fam.ignored_keys):
          continue
        name = fam.canonical_key(key)
        if name is None:
          unused.append(key)
          continue
        if fam.skip_key(name, config):
          continue
        m = _LAYER.match(name)
        layer = None
        if m:
          name, layer = f"{m.group(1)}.{m.group(3)}", int(m.group(2))
        parts = tuple(name.split("."))
        shape = _leaf(shapes, list(parts))
        if shape is None or (layer is not None and layer >= shape[0]):
          unused.append(key)
          continue
        want = shape[1:] if layer is not None else shape
        got = st.shape(key)
        if tuple(got) != tuple(want):
          mismatched.append(f"{key}: checkpoint {tuple(got)} vs expected {tuple(want)}")
          continue
        held = sources.setdefault(parts, {})
        if layer in held:  # e.g. one tensor under two layouts' names, or one key in two shards
          duplicated.append(f"{key} ({os.path.basename(file)}) and {held[layer][1]} "
                            f"({os.path.basename(held[layer][0])}) both fill {name}"
                            + (f" layer {layer}" if layer is not None else ""))
          continue
        held[layer] = (file, key)
  unfilled = []
  for kp, shape in jax.tree_util.tree_flatten_with_path(shapes, is_leaf=is_shape)[0]:
    parts = tuple(k.key for k in kp)
    got = sources.get(parts, {})
    name = ".".join(parts)
    if "layers" in parts:
      missing = sorted(set(range(shape[0])) - set(got))
      if missing:
        unfilled.append(f"{name} (layers {missing})")
    elif None not in got:
      unfilled.append(name)
  if unused or unfilled or mismatched or duplicated:
    lines = [f"checkpoint {path} does not match the config ({fam.name} family):"]
    if unused:
      lines.append(f"  unused checkpoint keys ({len(unused)}): {sorted(unused)}")
    if unfilled:
      lines.append(f"  unfilled parameters ({len(unfilled)}): {unfilled}")
    if mismatched:
      lines.append(f"  shape mismatches ({len(mismatched)}): {mismatched}")
    if duplicated:
      lines.append(f"  parameters filled twice ({len(duplicated)}; keep one of each): {duplicated}")
    raise ValueError("\n".join(lines))
  return shapes, sources


def load_params(path: str, config, dtype=np.float32, *, family=None,
                sharding: Callable[[tuple, tuple], jax.sharding.Sharding] | None = None) -> dict:
  """Reads, validates and stacks the weights of `path` into the family's canonical tree.

  Args:
    path: checkpoint directory.
    config: the parsed config (selects the family unless `family` is given).
    dtype: numpy dtype of the params (ml_dtypes.bfloat16 for bfloat16).
    family: the family (default: `models.family.family_of(config)`).
    sharding: None for numpy arrays, or a function (param parts, shape) -> jax Sharding: each param is then
      built on its devices from per-device slices read from the files (`jax.make_array_from_callback`).
  """
  shapes, sources = index_checkpoint(path, config, family)
  dtype = np.dtype(dtype)
  with contextlib.ExitStack() as stack:
    files: dict[str, SafetensorsFile] = {}

    def tensor(file: str, key: str) -> np.ndarray:
      if file not in files:
        files[file] = stack.enter_context(SafetensorsFile(file))
      return files[file].get(key)

    def read(parts: tuple, shape: tuple, index: tuple) -> np.ndarray:
      src = sources[parts]
      if None in src:  # an unstacked param
        return np.ascontiguousarray(tensor(*src[None])[index], dtype=dtype)
      layers = range(shape[0])[index[0]] if index else range(shape[0])
      rest = index[1:] if index else ()
      return np.stack([np.asarray(tensor(*src[i])[rest], dtype=dtype) for i in layers])

    def build(kp, shape):
      parts = tuple(k.key for k in kp)
      if sharding is None:
        return read(parts, shape, ())
      return jax.make_array_from_callback(shape, sharding(parts, shape), lambda idx: read(parts, shape, idx),
                                          dtype=dtype)

    return jax.tree_util.tree_map_with_path(build, shapes, is_leaf=is_shape)
