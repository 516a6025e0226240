"""DeepSeek-V2 decoder weights -> air-jax params (models.deepseek_v2 tree).

Accepted expert layouts: the official per-expert keys (`mlp.experts.{j}.{gate,up,down}_proj.weight`, DeepSeek-V2
and DeepSeek-VL2 checkpoints) and transformers 5.x fused ones (`mlp.experts.gate_up_proj` [X, 2I, E], gate first,
and `mlp.experts.down_proj` [X, E, I]). `feed` takes canonical decoder names (after the caller strips its prefix,
e.g. `model.` / `language.model.`); `lm_head.weight` is passed as `lm_head.weight`.
"""

from __future__ import annotations

import re

import numpy as np

from convert.tree_fill import TreeFiller, set_fused_experts
from models import deepseek_v2
from models.deepseek_v2_config import DeepseekV2TextConfig

_IGNORED = re.compile(r"rotary_emb\.inv_freq$")


def shapes(cfg: DeepseekV2TextConfig) -> dict:
  tree = deepseek_v2.param_shapes(cfg)
  if not cfg.tie_word_embeddings:
    tree = dict(tree, lm_head={"weight": (cfg.vocab_size, cfg.hidden_size)})
  return tree


def feed(filler: TreeFiller, cfg: DeepseekV2TextConfig, key: str, name: str, array, prefix: str = "") -> None:
  """Writes one decoder tensor (decoder-relative `name`, checkpoint `key`) into `filler` at `prefix` + name."""
  if _IGNORED.search(name):
    return
  if cfg.tie_word_embeddings and name == "lm_head.weight":
    return
  if ".shared_experts." in name and cfg.n_shared_experts == 0 and 0 in np.shape(array):
    return  # transformers builds zero-width shared experts when there are none: nothing to load
  if set_fused_experts(filler, key, prefix + name, array):
    return
  filler.set(key, prefix + name, array)


def from_state_dict(state: dict, cfg: DeepseekV2TextConfig, dtype=np.float32, source: str = "state dict") -> dict:
  """Params from a `DeepseekV2ForCausalLM` state dict (name -> array): keys `model.*` and `lm_head.*`."""
  filler = TreeFiller(shapes(cfg), dtype, source)
  for key, arr in state.items():
    name = key[len("model."):] if key.startswith("model.") else key
    feed(filler, cfg, key, name, np.asarray(arr))
  return filler.finish()
