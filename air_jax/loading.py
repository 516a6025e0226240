"""`load_pretrained`: a local Hugging Face checkpoint directory of any registered family -> one object with params,
config and processor. The family comes from config.json (`models.family.family_for_config_dict`)."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from air_jax.config_checks import _walk, check_config_dict, check_param_memory
from air_jax.hub import resolve_checkpoint
from convert.checkpoint import resolve_tied_head
from models.family import family_for_config_dict, family_of

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(dtype) -> Any:
  if isinstance(dtype, str):
    if dtype not in _DTYPES:
      raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]
  return dtype


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass
class LoadedModel:
  """Params (the pytree leaves), plus the static config and the transformers processor (aux data).

  Being a pytree, it can be passed straight to jitted functions, sharded or donated like the params dict.
  """

  params: dict
  config: Any
  processor: Any = None
  path: str | None = None
  generation_eos: tuple[int, ...] = ()  # EOS ids of the checkpoint's generation_config.json (e.g. Qwen's two)

  def tree_flatten(self):
    """A pytree: the params are the leaves, the rest is static."""
    return (self.params,), (self.config, self.processor, self.path, self.generation_eos)

  @classmethod
  def tree_unflatten(cls, aux, children):
    """Inverse of `tree_flatten`."""
    return cls(children[0], *aux)

  @property
  def dtype(self):
    return jax.tree.leaves(self.params[family_of(self.config).decoder_path])[0].dtype

  @property
  def family(self):
    return family_of(self.config)

  def num_params(self) -> int:
    """The number of parameters (every leaf of the param tree)."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.params))


def load_processor(path: str, config=None):
  """The checkpoint's processor (tokenizer, image processor, chat template), loaded by its family.

  `path`: a checkpoint directory or a Hugging Face repository id (`air_jax.hub`).
  """
  path = resolve_checkpoint(path)
  if config is None:
    config, _ = load_config(path)
  return family_of(config).load_processor(path)


def read_config_json(path: str) -> tuple[dict, str]:
  """(the config.json dict, its file name) of a checkpoint directory, the file itself, or a repository id."""
  path = resolve_checkpoint(path, config_only=True)
  file = os.path.join(path, "config.json") if os.path.isdir(path) else path
  if not os.path.exists(file):
    raise FileNotFoundError(f"no config.json at {file}")
  with open(file) as f:
    try:
      raw = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{file} is not valid JSON: {e}") from e
  if not isinstance(raw, dict):
    raise ValueError(f"{file} must hold a JSON object")
  return raw, file


def load_config(path: str):
  """(config, family) of a checkpoint directory: the family is chosen from config.json's model_type/architectures."""
  raw, file = read_config_json(path)
  check_config_dict(raw, file)
  fam = family_for_config_dict(raw, file)
  try:
    config = fam.parse_config(raw)
  except (ValueError, TypeError) as e:
    raise ValueError(f"{file}: {e}{_field_hint(raw, e)}") from e
  return fam.complete_config(config, raw, os.path.dirname(file)), fam


def _field_hint(raw: dict, error: Exception) -> str:
  """' (field a.b = value: expected a number)' when a conversion error quotes a value config.json holds."""
  import re

  m = re.search(r"(?:could not convert string to float|invalid literal for int\(\) with base \d+): '(.*)'",
                str(error))
  if not m:
    return ""
  found = [path for path, _, value in _walk(raw) if isinstance(value, str) and value == m.group(1)]
  return f" (field {', '.join(found[:3])} = {m.group(1)!r}: expected a number)" if found else ""


def load_pretrained(path: str, dtype="float32", *, with_processor: bool = True, mesh=None) -> LoadedModel:
  """Loads a local Hugging Face checkpoint directory of any registered family (LLaVA-1.5, LLaVA-NeXT, ...).

  Args:
    path: directory with config.json, *.safetensors (sharded or not) and processor files, or a Hugging Face
      repository id (``org/name`` or ``org/name@revision``) resolved through the local cache or downloaded
      (safetensors and configs only; `air_jax.hub`).
    dtype: "float32", "bfloat16" or "float16" (params and compute dtype; softmax is always float32).
    with_processor: also load the transformers processor (needed by `generate`).
    mesh: optional (data, model) `jax.sharding.Mesh` (`air_jax.sharding.make_mesh`): the params are then
      tensor-parallel (Megatron split over "model", the family's `partition_rules`), each device's slice read
      from the files on its own; `generate` then splits the batch over "data".

  Returns:
    A LoadedModel whose `params` are jax arrays, streamed from the files one parameter (one device slice) at a
    time, so the model is never held twice in host memory.
  """
  path = resolve_checkpoint(path)
  config, fam = load_config(path)
  config = resolve_tied_head(path, config, fam)
  np_dtype = np.dtype(resolve_dtype(dtype))
  if mesh is None:  # a mesh spreads the params over its devices; the host holds one slice at a time
    check_param_memory(fam.param_shapes(config), np_dtype.itemsize, os.path.join(path, "config.json"))
  # The processor first: a missing tokenizer should not wait for gigabytes of weights to load.
  processor = fam.load_processor(path) if with_processor else None
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    sharding = lambda parts, shape: device
  else:
    from air_jax.sharding import param_shardings

    sharding = param_shardings(config, mesh)
  params = fam.load_params(path, config, np_dtype, sharding=sharding)
  generation = _generation_config(path)
  _warn_unapplied_generation_settings(generation, path)
  return LoadedModel(params=params, config=config, processor=processor, path=path,
                     generation_eos=generation_eos_ids(path, generation))


# generation_config.json fields transformers' generate applies by default, with their neutral values. air-jax
# decodes exactly as its `generate` call says (method, sampling, beams), so a checkpoint that sets one of these
# would give other tokens than transformers' default generate: say so once, at load.
_UNAPPLIED_GENERATION_FIELDS = {
    "do_sample": False, "num_beams": 1, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_new_tokens": None,
    "min_length": 0, "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None,
    "forced_eos_token_id": None, "forced_bos_token_id": None, "sequence_bias": None, "encoder_repetition_penalty": 1.0,
}


def _warn_unapplied_generation_settings(raw, path: str) -> None:
  import logging

  if not isinstance(raw, dict):
    return
  file = os.path.join(path, "generation_config.json")
  set_ = {k: raw[k] for k, neutral in _UNAPPLIED_GENERATION_FIELDS.items()
          if k in raw and raw[k] not in (neutral, None, [], {})}
  if set_:
    logging.getLogger("air_jax.loading").warning(
        "%s sets %s, which transformers' generate applies by default; air-jax decodes as each generate call says "
        "(greedy unless do_sample / num_beams are passed; no logits processors besides the method's), so "
        "its tokens can differ from transformers' defaults", file,
        ", ".join(f"{k}={v!r}" for k, v in set_.items()))


def _generation_config(path: str):
  """The parsed generation_config.json of a checkpoint directory, None when it has none."""
  file = os.path.join(path, "generation_config.json")
  if not os.path.isfile(file):
    return None
  try:
    with open(file) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{file} is not valid JSON: {e}") from e


def generation_eos_ids(path: str, raw=None) -> tuple[int, ...]:
  """The `eos_token_id` (int or list) of the checkpoint's generation_config.json, () when it has none; `raw`:
  that file already parsed (`_generation_config`), else it is read here."""
  file = os.path.join(path, "generation_config.json")
  raw = _generation_config(path) if raw is None else raw
  eos = raw.get("eos_token_id") if isinstance(raw, dict) else None
  eos = [eos] if isinstance(eos, int) and not isinstance(eos, bool) else eos
  if eos is None:
    return ()
  if not isinstance(eos, list) or not all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in eos):
    raise ValueError(f"{file}: eos_token_id must be an int or a list of ints, got {raw.get('eos_token_id')!r}")
  return tuple(eos)
