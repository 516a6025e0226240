"""Loads a local Hugging Face LLaVA checkpoint directory into air-jax params (kept for its callers).

The key layouts live with each family (`models.llava.KEY_PREFIXES`, `models.llava_next`); the loader itself is
family-agnostic (`convert.checkpoint`): every checkpoint key must be used and every parameter filled with the
right shape, otherwise a ValueError lists the unused keys, unfilled parameters and shape mismatches. Pickle
checkpoints are refused.
"""

from __future__ import annotations

import numpy as np

from convert.checkpoint import checkpoint_files, index_checkpoint, load_params as _load
from models.llava import FAMILY


def canonical_key(key: str) -> str | None:
  """Maps a LLaVA-1.5 checkpoint key of any supported layout to the canonical dotted name (None if unknown)."""
  return FAMILY.canonical_key(key)


def load_params(path: str, config, dtype=np.float32) -> dict:
  """Reads, validates and stacks the weights of `path` into the canonical tree of numpy arrays in `dtype`."""
  return _load(path, config, dtype)


__all__ = ["canonical_key", "checkpoint_files", "index_checkpoint", "load_params"]
