"""air-jax params + LlavaConfig -> a Hugging Face LLaVA directory (transformers 5.x layout), without torch.

Writes `config.json` (the dict transformers' `LlavaConfig.to_json_file` writes for the same model, restricted to
the fields that matter) and `model.safetensors` with 5.x key names:
  language_model.model.*, language_model.lm_head.weight, vision_tower.*, multi_modal_projector.*
Stacked layers (`...layers.X` with a leading layer axis) are split into `...layers.{i}.X`. The inverse of
`convert.hf_llava.load_params`: loading the directory back gives the same params bit for bit (float32).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import jax
import numpy as np

from models.config import LlavaConfig, RopeConfig
from models.params import is_shape, param_shapes


# canonical top-level prefix -> 5.x checkpoint prefix
_PREFIX_5X = {
  "vision_tower": "vision_tower.",
  "multi_modal_projector": "multi_modal_projector.",
  "language_model": "language_model.model.",
  "lm_head": "language_model.lm_head.",
}


def _rope_dict(rope: RopeConfig) -> dict[str, Any]:
  d: dict[str, Any] = {"rope_theta": float(rope.rope_theta), "rope_type": rope.rope_type}
  if rope.rope_type != "default":
    d["factor"] = float(rope.factor)
  if rope.rope_type == "llama3":
    d["low_freq_factor"] = float(rope.low_freq_factor)
    d["high_freq_factor"] = float(rope.high_freq_factor)
  if rope.original_max_position_embeddings is not None:
    d["original_max_position_embeddings"] = int(rope.original_max_position_embeddings)
  return d


def config_dict(config: LlavaConfig) -> dict[str, Any]:
  """The transformers 5.x `config.json` dict of a LlavaConfig (architectures, text_config, vision_config...)."""
  v, t = config.vision, config.text
  eos = list(t.eos_token_id)
  text = {
    "model_type": "llama",
    "vocab_size": t.vocab_size,
    "hidden_size": t.hidden_size,
    "intermediate_size": t.intermediate_size,
    "num_hidden_layers": t.num_hidden_layers,
    "num_attention_heads": t.num_attention_heads,
    "num_key_value_heads": t.num_key_value_heads,
    "head_dim": t.head_dim,
    "hidden_act": t.hidden_act,
    "rms_norm_eps": t.rms_norm_eps,
    "max_position_embeddings": t.max_position_embeddings,
    "attention_bias": t.attention_bias,
    "attention_dropout": 0.0,
    "mlp_bias": t.mlp_bias,
    "tie_word_embeddings": t.tie_word_embeddings,
    "rope_parameters": _rope_dict(t.rope),
    "bos_token_id": t.bos_token_id,
    "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
    "pad_token_id": t.pad_token_id,
    "pretraining_tp": 1,
    "use_cache": True,
  }
  vision = {
    "model_type": "clip_vision_model",
    "hidden_size": v.hidden_size,
    "intermediate_size": v.intermediate_size,
    "num_hidden_layers": v.num_hidden_layers,
    "num_attention_heads": v.num_attention_heads,
    "num_channels": v.num_channels,
    "image_size": v.image_size,
    "patch_size": v.patch_size,
    "hidden_act": v.hidden_act,
    "layer_norm_eps": v.layer_norm_eps,
    "attention_dropout": 0.0,
  }
  layer = config.vision_feature_layer
  return {
    "architectures": ["LlavaForConditionalGeneration"],
    "model_type": "llava",
    "dtype": "float32",
    "image_token_index": config.image_token_id,
    "image_seq_length": config.num_image_tokens,
    "projector_hidden_act": config.projector_hidden_act,
    "multimodal_projector_bias": config.multimodal_projector_bias,
    "vision_feature_layer": layer if isinstance(layer, int) else list(layer),
    "vision_feature_select_strategy": config.vision_feature_select_strategy,
    "tie_word_embeddings": t.tie_word_embeddings,
    "text_config": text,
    "vision_config": vision,
  }


def checkpoint_tensors(params: dict, config: LlavaConfig) -> dict[str, np.ndarray]:
  """Flat {5.x checkpoint key: contiguous float32 array}, layers unstacked; shapes checked against the config.

  Args:
    params: the canonical param tree (dict, or an object with `.params`, e.g. a LoadedModel).
    config: the model's LlavaConfig.

  Raises:
    ValueError: naming every missing, extra or mis-shaped parameter.
  """
  params = getattr(params, "params", params)
  shapes = param_shapes(config)
  want = {tuple(k.key for k in kp): s for kp, s in jax.tree_util.tree_flatten_with_path(shapes, is_leaf=is_shape)[0]}
  got = {tuple(k.key for k in kp): a for kp, a in jax.tree_util.tree_flatten_with_path(params)[0]}
  missing = sorted(".".join(k) for k in set(want) - set(got))
  extra = sorted(".".join(k) for k in set(got) - set(want))
  bad = sorted(f"{'.'.join(k)}: {tuple(np.shape(got[k]))} vs expected {want[k]}"
               for k in set(want) & set(got) if tuple(np.shape(got[k])) != want[k])
  if missing or extra or bad:
    raise ValueError(f"params do not match the config: missing {missing}, unexpected {extra}, shape mismatches {bad}")
  out: dict[str, np.ndarray] = {}
  for parts, arr in got.items():
    arr = np.ascontiguousarray(np.asarray(arr, dtype=np.float32))
    prefix, rest = _PREFIX_5X[parts[0]], list(parts[1:])
    if "layers" in rest:
      i = rest.index("layers")
      head, tail = ".".join(rest[:i + 1]), ".".join(rest[i + 1:])
      for layer in range(arr.shape[0]):
        out[f"{prefix}{head}.{layer}.{tail}"] = np.ascontiguousarray(arr[layer])
    else:
      out[prefix + ".".join(rest)] = arr
  return out


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def _atomic_write(path: str, write) -> None:
  d = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp.", suffix=os.path.basename(path))
  os.close(fd)
  try:
    write(tmp)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions of a new file
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


EXPORT_DTYPES = ("float32", "float16")


def export_hf(params: dict, config: LlavaConfig, out_dir: str | os.PathLike, dtype: str = "float32") -> None:
  """Writes `config.json` and `model.safetensors` (5.x keys) into out_dir (created; files replaced).

  The processor (tokenizer, image processor, chat template) is saved separately, e.g. with
  `processor.save_pretrained(out_dir)`.

  Args:
    params: the canonical param tree (or a LoadedModel).
    config: its LlavaConfig.
    out_dir: destination directory.
    dtype: "float32" (default) or "float16" (half the size; loaders cast back to their compute dtype).

  Raises:
    ValueError: an unknown dtype, or params that do not match the config.
  """
  from safetensors.numpy import save_file

  if dtype not in EXPORT_DTYPES:
    raise ValueError(f"dtype must be one of {EXPORT_DTYPES}, got {dtype!r}")
  out_dir = os.fspath(out_dir)
  tensors = {k: v.astype(dtype, copy=False) for k, v in checkpoint_tensors(params, config).items()}  # contiguous
  os.makedirs(out_dir, exist_ok=True)
  cfg = config_dict(config)
  cfg["dtype"] = dtype

  def write_config(tmp: str) -> None:
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(cfg, f, indent=2, sort_keys=True)
      f.write("\n")

  # "format": "pt" is the metadata transformers expects of a safetensors checkpoint.
  _atomic_write(os.path.join(out_dir, "model.safetensors"),
                lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
  _atomic_write(os.path.join(out_dir, "config.json"), write_config)
