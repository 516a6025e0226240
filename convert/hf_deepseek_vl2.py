"""Loads a local DeepSeek-VL2 checkpoint directory (official layout, deepseek-ai/deepseek-vl2-*) into air-jax params.

Official keys -> models.deepseek_vl2 tree:
  vision.patch_embed.proj.*            -> vision.embeddings.patch_embedding.*
  vision.pos_embed [1, N, E]            -> vision.embeddings.position_embedding.weight [N, E]
  vision.blocks.{i}.norm1/norm2         -> vision.encoder.layers.{i}.layer_norm1/layer_norm2
  vision.blocks.{i}.attn.qkv [3E, E]    -> self_attn.{q,k,v}_proj (split in q, k, v order, as timm reshapes it)
  vision.blocks.{i}.attn.proj           -> self_attn.out_proj;  vision.blocks.{i}.mlp.fc1/fc2 -> mlp.fc1/fc2
  vision.norm                           -> vision.post_layernorm
  vision.attn_pool.*                    -> skipped: the model is built with ignore_head=True, the pooled output is
                                           never used (the only keys skipped by name)
  projector.layers.{k}.*, image_newline, view_seperator (kept)
  language.model.*                      -> language_model.* (experts per expert or fused, see hf_deepseek_v2)
  language.lm_head.weight               -> lm_head.weight
The image token id comes from the checkpoint's tokenizer (`<image>`), since config.json does not carry it.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np

from convert import hf_deepseek_v2
from convert.hf_llava import checkpoint_files
from convert.safetensors_io import SafetensorsFile
from convert.tree_fill import TreeFiller
from models.deepseek_vl2 import DeepseekVL2Config, config_from_dict, param_shapes

_BLOCK = re.compile(r"^vision\.blocks\.(\d+)\.(.*)$")
_VISION = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.proj": "self_attn.out_proj", "mlp.fc1": "mlp.fc1",
           "mlp.fc2": "mlp.fc2"}


def tokenizer_image_token_id(path: str) -> int | None:
  """The id of '<image>' among the added tokens of `path`/tokenizer.json (None if absent)."""
  file = os.path.join(path, "tokenizer.json")
  if not os.path.exists(file):
    return None
  with open(file) as f:
    for tok in json.load(f).get("added_tokens", []):
      if tok.get("content") == "<image>":
        return int(tok["id"])
  return None


def load_config(path: str) -> DeepseekVL2Config:
  file = os.path.join(path, "config.json")
  if not os.path.exists(file):
    raise FileNotFoundError(f"no config.json at {file}")
  with open(file) as f:
    d = json.load(f)
  from models.deepseek_vl2 import FAMILY

  return FAMILY.complete_config(config_from_dict(d), d, path)


def feed(filler: TreeFiller, cfg: DeepseekVL2Config, key: str, arr) -> None:
  """Routes one official checkpoint tensor into `filler` (tree = param_shapes(cfg))."""
  if key.startswith("vision.attn_pool."):
    return
  if key.startswith("language.model."):
    hf_deepseek_v2.feed(filler, cfg.text, key, key[len("language.model."):], arr, prefix="language_model.")
    return
  if key == "language.lm_head.weight":
    if not cfg.text.tie_word_embeddings:
      filler.set(key, "lm_head.weight", arr)
    return
  if key.startswith(("projector.", "image_newline", "view_seperator")):
    filler.set(key, key, arr)
    return
  if key in ("vision.patch_embed.proj.weight", "vision.patch_embed.proj.bias"):
    filler.set(key, "vision.embeddings.patch_embedding." + key.rsplit(".", 1)[1], arr)
    return
  if key == "vision.pos_embed":  # official [1, N, E]
    if np.ndim(arr) < 2 or int(np.prod(np.shape(arr)[:-2])) != 1:
      filler.mismatched.append(f"{key}: checkpoint {tuple(np.shape(arr))} vs expected [1, N, E] or [N, E]")
      return
    filler.set(key, "vision.embeddings.position_embedding.weight", np.asarray(arr).reshape(np.shape(arr)[-2:]))
    return
  if key.startswith("vision.norm."):
    filler.set(key, "vision.post_layernorm." + key.rsplit(".", 1)[1], arr)
    return
  m = _BLOCK.match(key)
  if m:
    i, rest = m.group(1), m.group(2)
    sub, leaf = rest.rsplit(".", 1)
    base = f"vision.encoder.layers.{i}."
    if sub == "attn.qkv":  # fused [3E, E] / [3E]: q, k, v stacked on the first axis
      if np.ndim(arr) not in (1, 2) or np.shape(arr)[0] % 3:
        filler.mismatched.append(f"{key}: checkpoint {tuple(np.shape(arr))} is not a fused q/k/v tensor "
                                 "(first axis a multiple of 3)")
        return
      for part, name in zip(np.split(np.asarray(arr), 3, axis=0), ("q_proj", "k_proj", "v_proj")):
        filler.set(key, f"{base}self_attn.{name}.{leaf}", part)
      return
    if sub in _VISION:
      filler.set(key, f"{base}{_VISION[sub]}.{leaf}", arr)
      return
  filler.skip(key)


def load_params(path: str, config: DeepseekVL2Config, dtype=np.float32) -> dict:
  filler = TreeFiller(param_shapes(config), dtype, path)
  for file in checkpoint_files(path):
    with SafetensorsFile(file) as st:
      for key in st.keys():
        feed(filler, config, key, st.get(key))
  return filler.finish()
