"""A local Hugging Face OWL-ViT / OWLv2 checkpoint (`OwlViTForObjectDetection`, `Owlv2ForObjectDetection`) -> params.

Keys `owlvit.*` / `owlv2.*` (the CLIP-style backbone) lose their prefix; the detection heads keep their names.
Per-layer keys are stacked; every key must be used and every parameter filled (convert.checkpoint). The CLIP
logit scale and visual projection are not needed for detection and are read as parameters all the same, so that
an incomplete checkpoint is still refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import numpy as np

from models.owl import OwlConfig, parse_config

_IGNORED = (re.compile(r"position_ids$"),)


def param_shapes(cfg: OwlConfig) -> dict:
  """The canonical param tree of (shape tuple) leaves, transformers names without the owlvit/owlv2 prefix."""
  v, t = cfg.vision, cfg.text
  e, et = v.hidden_size, t.hidden_size

  def lin(o, i, bias=True, layers=None):
    pre = () if layers is None else (layers,)
    return {"weight": pre + (o, i), **({"bias": pre + (o,)} if bias else {})}

  def ln(n, layers=None):
    pre = () if layers is None else (layers,)
    return {"weight": pre + (n,), "bias": pre + (n,)}

  def encoder(width, inter, n):
    return {"layers": {
        "layer_norm1": ln(width, n), "layer_norm2": ln(width, n),
        "self_attn": {k: lin(width, width, True, n) for k in ("q_proj", "k_proj", "v_proj", "out_proj")},
        "mlp": {"fc1": lin(inter, width, True, n), "fc2": lin(width, inter, True, n)},
    }}

  vision = {
      "embeddings": {"class_embedding": (e,),
                     "patch_embedding": {"weight": (e, v.num_channels, v.patch_size, v.patch_size)},
                     "position_embedding": {"weight": (v.num_patches + 1, e)}},
      "pre_layernorm": ln(e),
      "encoder": encoder(e, v.intermediate_size, v.num_hidden_layers),
      "post_layernorm": ln(e),
  }
  text = {
      "embeddings": {"token_embedding": {"weight": (t.vocab_size, et)},
                     "position_embedding": {"weight": (t.max_position_embeddings, et)}},
      "encoder": encoder(et, t.intermediate_size, t.num_hidden_layers),
      "final_layer_norm": ln(et),
  }
  box = {"dense0": lin(e, e), "dense1": lin(e, e), "dense2": lin(4, e)}
  shapes = {
      "vision_model": vision, "text_model": text,
      "visual_projection": {"weight": (cfg.projection_dim, e)},
      "text_projection": {"weight": (cfg.projection_dim, et)},
      "logit_scale": (),
      "class_head": {"dense0": lin(et, e), "logit_shift": lin(1, e), "logit_scale": lin(1, e)},
      "box_head": box,
      "layer_norm": ln(e),
  }
  if cfg.version == 2:
    shapes["objectness_head"] = {"dense0": lin(e, e), "dense1": lin(e, e), "dense2": lin(1, e)}
  return shapes


@dataclasses.dataclass(frozen=True)
class OwlKeyTable:
  """The key table `convert.checkpoint` reads (the same protocol a model family provides)."""

  prefix: str
  name: str = "owl"
  ignored_keys: tuple = _IGNORED

  def param_shapes(self, cfg: OwlConfig) -> dict:
    return param_shapes(cfg)

  def canonical_key(self, key: str) -> str | None:
    return key[len(self.prefix) + 1:] if key.startswith(self.prefix + ".") else key

  def skip_key(self, name: str, cfg) -> bool:
    return False


def load_config(path: str | os.PathLike) -> OwlConfig:
  path = os.fspath(path)
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_path):
    raise FileNotFoundError(f"detector checkpoint {path}: no config.json (expected a Hugging Face OWL-ViT or OWLv2 "
                            "directory, e.g. google/owlv2-base-patch16-ensemble saved locally)")
  with open(cfg_path) as f:
    try:
      d = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{cfg_path} is not valid JSON: {e}") from e
  if not isinstance(d, dict):
    raise ValueError(f"{cfg_path}: the top level must be a JSON object")
  return parse_config(d)


def load_owl(path: str | os.PathLike, dtype=np.float32) -> tuple[dict, OwlConfig]:
  """(params, config) of a local OWL detector directory; every key checked (see convert.checkpoint)."""
  from convert.checkpoint import load_params

  path = os.fspath(path)
  cfg = load_config(path)
  params = load_params(path, cfg, dtype, family=OwlKeyTable(prefix=cfg.prefix))
  return params, cfg
