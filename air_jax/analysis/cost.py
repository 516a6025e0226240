"""C.3: the methods benchmark's results (`bench/results/methods.json`) read and checked for the cost chart.

Schema: {"model": str, "methods": {name: {"ms_per_token": float, "caption_s": float, "ratio": float,
"paper_ratio": float | null}}}; ratio is the time relative to greedy.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

FIELDS = {"ms_per_token": False, "caption_s": False, "ratio": False, "paper_ratio": True}  # name -> nullable


def read_methods_json(path: str | os.PathLike) -> dict[str, Any]:
  """Loads and validates a methods benchmark JSON; errors name the file, the method and the field."""
  path = os.fspath(path)
  try:
    with open(path) as f:
      data = json.load(f)
  except OSError as e:
    raise ValueError(f"methods benchmark {path}: cannot read it ({e})") from e
  except json.JSONDecodeError as e:
    raise ValueError(f"methods benchmark {path}: not valid JSON ({e})") from e
  if not isinstance(data, dict) or not isinstance(data.get("methods"), dict) or not data["methods"]:
    raise ValueError(f"methods benchmark {path}: expected {{'model': str, 'methods': {{name: {{...}}}}}} with at "
                     "least one method")
  methods = {}
  for name, entry in data["methods"].items():
    if not isinstance(entry, dict):
      raise ValueError(f"methods benchmark {path}: methods[{name!r}] must be an object")
    row = {}
    for field, nullable in FIELDS.items():
      value = entry.get(field)
      if value is None and nullable:
        row[field] = None
        continue
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"methods benchmark {path}: methods[{name!r}][{field!r}] = {value!r}; expected a "
                         f"non-negative number{' or null' if nullable else ''}")
      row[field] = float(value)
    methods[name] = row
  return {"model": str(data.get("model", "")), "methods": methods}


__all__ = ["FIELDS", "read_methods_json"]
