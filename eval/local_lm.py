"""A Hugging Face Llama causal LM (``LlamaForCausalLM`` safetensors) run with air-jax's own JAX decoder.

Used by the local judge (``eval.judges.LocalLMJudge``): the checkpoint's decoder is loaded into the same param
tree ``models.llama`` runs for LLaVA's language model (keys ``model.*`` -> ``language_model.*``, per-layer keys
stacked) and decoded with ``air_jax.decoding.generate_tokens`` without an image (no image token, all keys text).
Loading checks that every checkpoint key is used and every parameter filled with the right shape; pickle
checkpoints are refused (``convert.hf_llava.checkpoint_files``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from convert.hf_llava import checkpoint_files
from convert.safetensors_io import SafetensorsFile
from models.config import LlavaConfig, text_config_from_dict
from models.params import is_shape, param_shapes


_LAYER = re.compile(r"^(.*?\blayers)\.(\d+)\.(.*)$")
_IGNORED = re.compile(r"\.rotary_emb\.inv_freq$")


@dataclasses.dataclass
class CausalLM:
  """Params ``{"language_model", "lm_head"?}``, a LlavaConfig wrapping the text config, the tokenizer."""

  params: dict
  config: LlavaConfig
  tokenizer: Any
  path: str


def _canonical(key: str) -> str | None:
  if key.startswith("model."):
    return "language_model." + key[len("model."):]
  if key.startswith("lm_head."):
    return key
  return None


def load_params(path: str, config: LlavaConfig, dtype=np.float32) -> dict:
  """The checkpoint's decoder params (numpy), checked key by key against ``models.params.param_shapes``."""
  full = param_shapes(config)
  shapes = {k: full[k] for k in ("language_model", "lm_head") if k in full}
  out: dict = jax.tree.map(lambda s: None, shapes, is_leaf=is_shape)
  filled: dict[tuple, set] = {}
  unused, mismatched = [], []
  tied = config.text.tie_word_embeddings
  for file in checkpoint_files(path):
    with SafetensorsFile(file) as st:
      for key in st.keys():
        if _IGNORED.search(key):
          continue
        name = _canonical(key)
        if name is None or (tied and name == "lm_head.weight"):
          if name is None:
            unused.append(key)
          continue
        m = _LAYER.match(name)
        layer = None
        if m:
          name, layer = f"{m.group(1)}.{m.group(3)}", int(m.group(2))
        parts = name.split(".")
        node = shapes
        for p in parts:
          node = node.get(p) if isinstance(node, dict) else None
        if not isinstance(node, tuple) or (layer is not None and layer >= node[0]):
          unused.append(key)
          continue
        want = node[1:] if layer is not None else node
        if tuple(st.shape(key)) != tuple(want):
          mismatched.append(f"{key}: checkpoint {tuple(st.shape(key))} vs expected {tuple(want)}")
          continue
        target = out
        for p in parts[:-1]:
          target = target[p]
        if target[parts[-1]] is None:
          target[parts[-1]] = np.zeros(node, dtype)
        arr = st.get(key).astype(dtype)
        if layer is None:
          target[parts[-1]] = arr
        else:
          target[parts[-1]][layer] = arr
        filled.setdefault(tuple(parts), set()).add(layer)
  unfilled = []
  for kp, shape in jax.tree_util.tree_flatten_with_path(shapes, is_leaf=is_shape)[0]:
    parts = tuple(k.key for k in kp)
    got = filled.get(parts, set())
    if "layers" in parts:
      missing = sorted(set(range(shape[0])) - got)
      if missing:
        unfilled.append(f"{'.'.join(parts)} (layers {missing})")
    elif not got:
      unfilled.append(".".join(parts))
  if unused or unfilled or mismatched:
    lines = [f"checkpoint {path} is not a Llama causal LM matching its config.json:"]
    for what, items in (("unused checkpoint keys", unused), ("unfilled parameters", unfilled),
                        ("shape mismatches", mismatched)):
      if items:
        lines.append(f"  {what} ({len(items)}): {sorted(items)[:20]}")
    raise ValueError("\n".join(lines))
  return out


def load_causal_lm(path: str | os.PathLike, dtype: str = "float32") -> CausalLM:
  """Loads ``config.json`` (model_type llama), the safetensors weights and the tokenizer of a directory."""
  from transformers import AutoTokenizer

  from air_jax.loading import resolve_dtype

  path = os.fspath(path)
  cfg_file = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_file):
    raise FileNotFoundError(f"no config.json in the judge model directory {path}")
  with open(cfg_file) as f:
    d = json.load(f)
  if d.get("model_type", "llama") != "llama":
    raise ValueError(f"{cfg_file}: model_type {d.get('model_type')!r} is not supported by the local judge "
                     "(Llama-architecture causal LMs only)")
  text = text_config_from_dict(d)
  config = LlavaConfig(text=text, image_token_id=-1)  # no image token: every key is text
  params = jax.tree.map(jnp.asarray, load_params(path, config, np.dtype(resolve_dtype(dtype))))
  try:
    tokenizer = AutoTokenizer.from_pretrained(path)
  except Exception as e:  # transformers raises many types here; name the directory
    raise ValueError(f"could not load the tokenizer of the judge model {path}: {e}") from e
  return CausalLM(params=params, config=config, tokenizer=tokenizer, path=path)


def format_chat(tokenizer, prompt: str) -> str:
  """The tokenizer's chat template around one user turn, or the bare prompt when it has none."""
  if getattr(tokenizer, "chat_template", None):
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
  return prompt


def generate_text(lm: CausalLM, prompt: str, *, max_new_tokens: int = 256, temperature: float = 0.0,
                  seed: int = 0, bucket: int = 64, chat: bool = True) -> str:
  """Greedy (temperature 0) or sampled continuation of one prompt; the prompt is left padded to a bucket."""
  from air_jax import decoding
  from air_jax.generate import eos_token_ids, pad_token_id

  tok = lm.tokenizer
  text = format_chat(tok, prompt) if chat else prompt
  ids = np.asarray(tok(text, add_special_tokens=not (chat and getattr(tok, "chat_template", None)))["input_ids"],
                   np.int32)
  if ids.size == 0:
    raise ValueError("the judge prompt tokenises to nothing")
  t = -(-ids.size // bucket) * bucket
  pad = pad_token_id(tok)
  input_ids = np.full((1, t), pad, np.int32)
  mask = np.zeros((1, t), np.int32)
  input_ids[0, t - ids.size:] = ids
  mask[0, t - ids.size:] = 1
  limit = lm.config.text.max_position_embeddings
  if ids.size + max_new_tokens > limit:
    raise ValueError(f"the judge prompt has {ids.size} tokens; with {max_new_tokens} new tokens it exceeds the "
                     f"model's {limit} positions")
  sampling = decoding.Sampling(greedy=temperature <= 0)
  sv = decoding.SamplingValues.make(seed, max(temperature, 1e-6))
  out = decoding.generate_tokens_jit(lm.params, lm.config, jnp.asarray(input_ids), jnp.asarray(mask), None, None,
                                     sv, max_new_tokens=max_new_tokens, sampling=sampling,
                                     eos_ids=eos_token_ids(lm.config, tok), pad_id=pad)
  tokens = np.asarray(out["tokens"])[0, : int(np.asarray(out["num_tokens"])[0])]
  return tok.decode(tokens, skip_special_tokens=True).strip()
