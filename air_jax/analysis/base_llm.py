"""The base language model of A.2: a Hugging Face causal-LM directory (e.g. Vicuna for LLaVA-1.5) run with the
project's own Llama decoder (`models.llama`), wrapped so that `model_io.decoder_attentions` runs it text only.

Keys accepted: `model.*` (embed_tokens, layers.{i}.*, norm) and `lm_head.weight` (transformers'
`LlamaForCausalLM`). Every checkpoint key must be used and every parameter filled with the right shape.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import jax.numpy as jnp
import numpy as np

from air_jax.hub import resolve_checkpoint
from air_jax.loading import LoadedModel
from convert.hf_llava import checkpoint_files
from convert.safetensors_io import SafetensorsFile
from models.config import LlavaConfig, text_config_from_dict
from models.params import is_shape, param_shapes


_LAYER = re.compile(r"^layers\.(\d+)\.(.*)$")
_IGNORED = re.compile(r"\.rotary_emb\.inv_freq$")
NO_IMAGE_TOKEN = -1  # no input id equals it: every position is a text key


def load_base_llm(path: str, dtype=np.float32) -> LoadedModel:
  """Loads a LlamaForCausalLM directory (or Hugging Face repository id) as a text-only LoadedModel (processor:
  its tokenizer or None)."""
  path = resolve_checkpoint(path, what="base LLM")
  cfg_file = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_file):
    raise FileNotFoundError(f"base LLM: no config.json in {path}")
  with open(cfg_file) as f:
    d = json.load(f)
  if d.get("model_type") != "llama":
    raise ValueError(f"base LLM {cfg_file}: model_type {d.get('model_type')!r} is not supported; expected 'llama' "
                     "(a LlamaForCausalLM directory such as Vicuna)")
  text = text_config_from_dict(d, tie_default=bool(d.get("tie_word_embeddings", False)))
  config = LlavaConfig(text=text, image_token_id=NO_IMAGE_TOKEN)
  shapes = param_shapes(config)
  want = {"language_model": shapes["language_model"]}
  if "lm_head" in shapes:
    want["lm_head"] = shapes["lm_head"]
  params: dict[str, Any] = {"language_model": {"embed_tokens": {}, "norm": {}, "layers": {}}, "lm_head": {}}
  filled, unused, bad = set(), [], []
  nl = text.num_hidden_layers
  for file in checkpoint_files(path):
    with SafetensorsFile(file) as st:
      for key in st.keys():
        if _IGNORED.search(key):
          continue
        if key.startswith("model."):
          name, root = key[len("model."):], "language_model"
        elif key.startswith("lm_head.") and "lm_head" in want:
          name, root = key[len("lm_head."):], "lm_head"
        elif key.startswith("lm_head.") and text.tie_word_embeddings:
          continue
        else:
          unused.append(key)
          continue
        m = _LAYER.match(name) if root == "language_model" else None
        parts = (["layers"] + m.group(2).split(".")) if m else name.split(".")
        node_shape = want[root]
        for p in parts:
          node_shape = node_shape.get(p) if isinstance(node_shape, dict) else None
          if node_shape is None:
            break
        if not isinstance(node_shape, tuple) or (m and int(m.group(1)) >= nl):
          unused.append(key)
          continue
        expect = node_shape[1:] if m else node_shape
        if tuple(st.shape(key)) != tuple(expect):
          bad.append(f"{key}: checkpoint {tuple(st.shape(key))} vs expected {tuple(expect)}")
          continue
        node = params[root]
        for p in parts[:-1]:
          node = node.setdefault(p, {})
        arr = st.get(key).astype(dtype)
        if m:
          node.setdefault(parts[-1], np.zeros(node_shape, dtype))[int(m.group(1))] = arr
          filled.add((root, *parts, int(m.group(1))))
        else:
          node[parts[-1]] = arr
          filled.add((root, *parts))
  missing = []
  import jax

  for kp, shape in jax.tree_util.tree_flatten_with_path(want, is_leaf=is_shape)[0]:
    parts = tuple(k.key for k in kp)
    if "layers" in parts:
      gone = [i for i in range(nl) if (*parts, i) not in filled]
      if gone:
        missing.append(f"{'.'.join(parts)} (layers {gone})")
    elif parts not in filled:
      missing.append(".".join(parts))
  if unused or missing or bad:
    raise ValueError(f"base LLM checkpoint {path} does not match its config.json: unused keys {sorted(unused)}, "
                     f"unfilled parameters {missing}, shape mismatches {bad}")
  if "lm_head" not in want:
    params.pop("lm_head")
  params = jax.tree.map(jnp.asarray, params)
  return LoadedModel(params=params, config=config, processor=_tokenizer(path), path=path)


def _tokenizer(path: str):
  """The directory's tokenizer, or None when it has none (then the LVLM's ids are used as they are)."""
  if not any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model")):
    return None
  from transformers import AutoTokenizer

  return AutoTokenizer.from_pretrained(path)


__all__ = ["NO_IMAGE_TOKEN", "load_base_llm"]
