"""Checkpoint loading driven by a table: (checkpoint prefix -> canonical prefix) pairs and a param shape tree.

The same rules as convert/hf_llava.py, for families whose trees differ: per-layer keys `...<stack>.{i}.X` (stack
one of `layers`, `layer`, `blocks`) fill `...<stack>.X` at index i of a leading layer axis; every checkpoint key
must be used, every parameter filled, every shape right, otherwise one ValueError lists all problems.
"""

from __future__ import annotations

import re

import jax
import numpy as np

from convert.hf_llava import _IGNORED, _leaf, checkpoint_files
from convert.safetensors_io import SafetensorsFile

_STACKED = re.compile(r"^(.*?\b(?:layers|layer|blocks))\.(\d+)\.(.*)$")


def canonical(key: str, prefixes) -> str | None:
  for old, new in prefixes:
    if key.startswith(old):
      return new + key[len(old):]
  return None


def load_with_table(path: str, shapes: dict, prefixes, *, tied: bool, dtype=np.float32) -> dict:
  """Reads `path` (safetensors, sharded or not) into the tree `shapes` describes (numpy arrays in `dtype`).

  Args:
    shapes: nested dicts of shape tuples; stacked leaves have the layer count first.
    prefixes: ordered (checkpoint prefix, canonical prefix) pairs, longest first; the first match wins.
    tied: the head is the embedding matrix; a stored `lm_head.weight` is skipped.
  """
  out = jax.tree.map(lambda s: None, shapes, is_leaf=lambda x: isinstance(x, tuple))
  filled: dict[tuple, set] = {}
  unused, mismatched = [], []
  for file in checkpoint_files(path):
    with SafetensorsFile(file) as st:
      for key in st.keys():
        if any(p.search(key) for p in _IGNORED):
          continue
        name = canonical(key, prefixes)
        if name is None:
          unused.append(key)
          continue
        if tied and name == "lm_head.weight":
          continue
        layer = None
        parts = name.split(".")
        shape = _leaf(shapes, parts)
        m = _STACKED.match(name)
        if shape is None and m:  # a stacked leaf; names like `mlp.0.weight` are plain leaves
          name, layer = f"{m.group(1)}.{m.group(3)}", int(m.group(2))
          parts = name.split(".")
          shape = _leaf(shapes, parts)
        if shape is None or (layer is not None and layer >= shape[0]):
          unused.append(key)
          continue
        want = shape[1:] if layer is not None else shape
        got = st.shape(key)
        if tuple(got) != tuple(want):
          mismatched.append(f"{key}: checkpoint {tuple(got)} vs expected {tuple(want)}")
          continue
        node = out
        for p in parts[:-1]:
          node = node[p]
        if node[parts[-1]] is None:
          node[parts[-1]] = np.zeros(shape, dtype)
        arr = st.get(key).astype(dtype)
        if layer is None:
          node[parts[-1]] = arr
        else:
          node[parts[-1]][layer] = arr
        filled.setdefault(tuple(parts), set()).add(layer)
  unfilled = []
  for kp, shape in jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))[0]:
    parts = tuple(k.key for k in kp)
    got = filled.get(parts, set())
    name = ".".join(parts)
    if None in got:
      continue
    if got or any(p in ("layers", "layer", "blocks") for p in parts):
      missing = sorted(set(range(shape[0])) - got)
      if missing:
        unfilled.append(f"{name} (layers {missing})")
    else:
      unfilled.append(name)
  if unused or unfilled or mismatched:
    lines = [f"checkpoint {path} does not match the config:"]
    if unused:
      lines.append(f"  unused checkpoint keys ({len(unused)}): {sorted(unused)}")
    if unfilled:
      lines.append(f"  unfilled parameters ({len(unfilled)}): {unfilled}")
    if mismatched:
      lines.append(f"  shape mismatches ({len(mismatched)}): {mismatched}")
    raise ValueError("\n".join(lines))
  return out


def stored_head_differs(path: str, prefixes, embed: str = "language_model.embed_tokens.weight") -> bool:
  """True when the checkpoint stores an `lm_head.weight` that is not the embedding matrix.

  transformers then leaves the head untied even if the config asks for tying (it warns); loaders use this to
  pick the same structure.
  """
  found = {}
  for file in checkpoint_files(path):
    with SafetensorsFile(file) as st:
      for key in st.keys():
        name = canonical(key, prefixes)
        if name in ("lm_head.weight", embed):
          found[name] = (file, key)
  if "lm_head.weight" not in found or embed not in found:
    return False
  arrays = []
  for name in ("lm_head.weight", embed):
    file, key = found[name]
    with SafetensorsFile(file) as st:
      arrays.append(np.array(st.get(key)))
  return arrays[0].shape != arrays[1].shape or not np.array_equal(arrays[0], arrays[1])
