"""Loads a local Hugging Face InstructBLIP (Vicuna) checkpoint directory into air-jax params (models.instructblip).

Key layouts: `language_model.model.*` / `language_model.lm_head.*` (transformers, all versions that save
InstructBlipForConditionalGeneration) and the `model.language_model.*` / `lm_head.*` layout of newer
`*ForConditionalGeneration` refactors. Vision, Q-Former, query tokens and projection keep their names. Every key
must be used and every parameter filled (convert.tree_fill); pickle checkpoints are refused.
"""

from __future__ import annotations

import re

import numpy as np

from convert.hf_llava import checkpoint_files
from convert.safetensors_io import SafetensorsFile
from convert.tree_fill import TreeFiller
from models.instructblip import InstructBlipConfig, param_shapes

_PREFIXES = (
    ("language_model.model.", "language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.language_model.", "language_model."),
    ("model.vision_model.", "vision_model."),
    ("model.qformer.", "qformer."),
    ("model.query_tokens", "query_tokens"),
    ("model.language_projection.", "language_projection."),
    ("lm_head.", "lm_head."),
    ("vision_model.", "vision_model."),
    ("qformer.", "qformer."),
    ("query_tokens", "query_tokens"),
    ("language_projection.", "language_projection."),
)
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|embeddings\.position_ids)$")


def canonical_key(key: str) -> str | None:
  for old, new in _PREFIXES:
    if key.startswith(old):
      return new + key[len(old):]
  return None


def load_params(path: str, config: InstructBlipConfig, dtype=np.float32) -> dict:
  filler = TreeFiller(param_shapes(config), dtype, path)
  tied = config.text.tie_word_embeddings
  for file in checkpoint_files(path):
    with SafetensorsFile(file) as st:
      for key in st.keys():
        if _IGNORED.search(key):
          continue
        name = canonical_key(key)
        if name is None:
          filler.skip(key)
          continue
        if tied and name == "lm_head.weight":
          continue
        filler.set(key, name, st.get(key))
  return filler.finish()
