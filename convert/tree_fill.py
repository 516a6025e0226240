"""Fills a param tree of known shapes from named checkpoint tensors, and reports what did not fit.

The shape tree is nested dicts (and tuples for per-layer lists) with shape-tuple leaves. A dotted name walks it;
an integer part either selects a tuple element (per-layer trees), a dict key spelled as digits (torch Sequential
indices) or, otherwise in a dict, is an index into the leading (stacked) axis of every leaf below it
(`layers.3.mlp.fc1.weight` -> leaf `layers.mlp.fc1.weight`, row 3). `finish()` raises one ValueError listing
unused keys, unfilled parameters (with missing rows), shape mismatches and parameters filled twice (every element
has one source), so a checkpoint that does not match its config never loads silently.
"""

from __future__ import annotations

import re

import numpy as np

from models.params import is_shape

# transformers 5.x's fused MoE expert tensors (DeepSeek-V2, Qwen3-MoE): `...layers.{i}.mlp.experts.gate_up_proj`
# [X, 2I, E] (gate rows first) and `...experts.down_proj` [X, E, I].
_FUSED_EXPERTS = re.compile(r"^(.*\blayers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")


class TreeFiller:
  """Allocates leaves lazily in `dtype` and records which (leaf, row) pairs were written, and by which key."""

  def __init__(self, shapes, dtype, source: str):
    self.shapes, self.dtype, self.source = shapes, np.dtype(dtype), source
    self.values: dict[tuple, np.ndarray] = {}
    self.unused: list[str] = []
    self.mismatched: list[str] = []
    self.duplicated: list[str] = []
    self.writer: dict[tuple, dict] = {}  # leaf path -> {rows: checkpoint key that wrote them}
    self.below: dict[tuple, dict] = {}  # leaf path -> {proper prefix of written rows: a key written under it}

  def _resolve(self, name: str):
    """-> (leaf path tuple, leaf shape, stacked row indices tuple) or None."""
    node, path, rows = self.shapes, [], []
    for part in name.split("."):
      if isinstance(node, tuple) and not is_shape(node):
        if not part.isdigit() or int(part) >= len(node):
          return None
        node = node[int(part)]
        path.append(int(part))
      elif isinstance(node, dict):
        if part.isdigit() and part not in node:
          rows.append(int(part))
          continue
        if part not in node:
          return None
        node = node[part]
        path.append(part)
      else:
        return None
    if not is_shape(node):
      return None
    return tuple(path), node, tuple(rows)

  def set(self, key: str, name: str, array) -> bool:
    """Writes `array` (checkpoint key `key`) at canonical `name`; False (and recorded) if it has no place."""
    hit = self._resolve(name)
    if hit is None:
      self.unused.append(key)
      return False
    path, shape, rows = hit
    want = shape[len(rows):]
    if any(r >= s for r, s in zip(rows, shape)):
      self.unused.append(key)
      return False
    if tuple(array.shape) != tuple(want):
      self.mismatched.append(f"{key}: checkpoint {tuple(array.shape)} vs expected {tuple(want)}")
      return False
    # Every element is written once: a second writer of the same rows (or of rows overlapping a whole-leaf or
    # per-row write, e.g. fused and per-expert weights of one layer) is a checkpoint that fills a param twice.
    written, below = self.writer.setdefault(path, {}), self.below.setdefault(path, {})
    other = next((written[rows[:k]] for k in range(len(rows) + 1) if rows[:k] in written), below.get(rows))
    if other is not None:
      self.duplicated.append(f"{key} and {other} both fill {'.'.join(map(str, path))}"
                             + (f" rows {list(rows)}" if rows else ""))
      return False
    if path not in self.values:
      self.values[path] = np.zeros(shape, self.dtype)
    self.values[path][rows] = np.asarray(array).astype(self.dtype)
    written[rows] = key
    for k in range(len(rows)):
      below.setdefault(rows[:k], key)
    return True

  def skip(self, key: str) -> None:
    self.unused.append(key)

  def finish(self):
    """The filled tree (numpy leaves); raises ValueError naming every problem."""
    unfilled = []

    def build(node, path):
      if is_shape(node):
        got = set(self.writer.get(path, {}))
        if len({len(r) for r in got}) > 1:  # mixed whole / per-row writes are refused in `set`
          unfilled.append(".".join(map(str, path)) + " (written at mixed depths)")
          return None
        n_stack = len(next(iter(got))) if got else 0
        need = int(np.prod(node[:n_stack])) if got else 1
        if not got or len(got) < need:
          unfilled.append(".".join(map(str, path)) + (f" ({len(got)}/{need} rows)" if got else ""))
          return None
        return self.values[path]
      if isinstance(node, tuple):
        return tuple(build(v, path + (i,)) for i, v in enumerate(node))
      return {k: build(v, path + (k,)) for k, v in node.items()}

    out = build(self.shapes, ())
    if self.unused or unfilled or self.mismatched or self.duplicated:
      lines = [f"checkpoint {self.source} does not match the config:"]
      if self.unused:
        lines.append(f"  unused checkpoint keys ({len(self.unused)}): {sorted(self.unused)[:50]}")
      if unfilled:
        lines.append(f"  unfilled parameters ({len(unfilled)}): {unfilled[:50]}")
      if self.mismatched:
        lines.append(f"  shape mismatches ({len(self.mismatched)}): {self.mismatched[:50]}")
      if self.duplicated:
        lines.append(f"  parameters filled twice ({len(self.duplicated)}; keep one of each): {self.duplicated[:50]}")
      raise ValueError("\n".join(lines))
    return out


def set_fused_experts(filler: TreeFiller, key: str, name: str, array) -> bool:
  """Writes a fused expert tensor (canonical `name`, checkpoint `key`) as the per-expert-stacked params
  `...experts.{gate_proj, up_proj, down_proj}.weight` ([X, I, E] / [X, E, I]); False when `name` is not one (the
  per-expert keys `...experts.{j}.gate_proj.weight` need no help: `set` stacks them on the expert axis)."""
  m = _FUSED_EXPERTS.match(name)
  if m is None:
    return False
  arr = np.asarray(array)
  if arr.ndim != 3 or (m.group(2) == "gate_up_proj" and arr.shape[1] % 2):
    want = "2 * intermediate, hidden" if m.group(2) == "gate_up_proj" else "hidden, intermediate"
    filler.mismatched.append(f"{key}: checkpoint {arr.shape} is not a fused expert tensor [experts, {want}]")
    return True
  if m.group(2) == "gate_up_proj":
    i = arr.shape[1] // 2
    filler.set(key, m.group(1) + ".gate_proj.weight", arr[:, :i])
    filler.set(key, m.group(1) + ".up_proj.weight", arr[:, i:])
  else:
    filler.set(key, m.group(1) + ".down_proj.weight", arr)
  return True


def place(tree, sharding):
  """A filled numpy tree as is (sharding None), or as jax arrays put where `sharding(parts, shape)` says (the
  callback convention of convert.checkpoint.load_params; parts are the dict keys and tuple indices of the leaf, as
  strings, so a dotted path such as "language_model.layers.3.mlp.experts.gate_proj.weight" can be matched)."""
  if sharding is None:
    return tree
  import jax

  def put(kp, x):
    parts = tuple(str(getattr(k, "key", getattr(k, "idx", ""))) for k in kp)  # tuple indices as "0", "1", ...
    return jax.device_put(x, sharding(parts, x.shape))

  return jax.tree_util.tree_map_with_path(put, tree)
