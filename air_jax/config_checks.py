"""Checks of a checkpoint's config.json made before any family parses it or anything is allocated.

Families parse their own fields; these generic checks catch what would otherwise surface as a ZeroDivisionError,
an anonymous int() error, a shape error blamed on the checkpoint, or hundreds of GiB allocated before failing:
  - every size field present (hidden_size, num_attention_heads, patch_size, ... at any nesting level) is a
    positive int;
  - heads divide the width when no head_dim is given, key/value heads divide the query heads, the patch size
    divides the image size;
  - the parameters the config describes fit in memory (`check_param_memory`, from the family's shape tree).
"""

from __future__ import annotations

import numpy as np

_ZERO_OK = ("q_lora_rank", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")
SIZE_FIELDS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "vocab_size", "image_size", "patch_size", "max_position_embeddings", "num_channels",
    "projection_dim", "moe_intermediate_size", "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim",
    "qk_nope_head_dim", "v_head_dim", "n_routed_experts", "num_experts_per_tok", "num_query_tokens",
    "spatial_merge_size", "temporal_patch_size", "out_hidden_size", "depth", "num_heads", "embed_dim",
)


def _walk(d: dict, prefix: str = ""):
  for k, v in d.items():
    if isinstance(v, dict):
      yield from _walk(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}", k, v


def check_config_dict(raw, source: str = "config.json") -> None:
  """Raises a ValueError naming the file, the field and the value for sizes that cannot describe a model."""
  if not isinstance(raw, dict):
    raise ValueError(f"{source} must hold a JSON object at the top level, got {type(raw).__name__}")
  for key, value in raw.items():  # the sub-model configs every family reads
    if key in ("text_config", "vision_config", "qformer_config", "language_config", "projector_config") \
        and not isinstance(value, dict):
      raise ValueError(f"{source}: {key} must be a JSON object (the sub-model's config), got "
                       f"{type(value).__name__} {value!r:.60}")
  for path, key, value in _walk(raw):
    if key not in SIZE_FIELDS or value is None:
      continue
    if isinstance(value, bool) or not isinstance(value, int):
      if isinstance(value, list) and key in ("image_size", "patch_size") and all(_int(x) for x in value):
        continue  # some configs give (height, width) (InternVL: both)
      raise ValueError(f"{source}: {path} = {value!r} must be a positive integer")
    # 0 is a real value of the MLA dims of a DeepSeek-V2 decoder without MLA (use_mla false, DeepSeek-VL2-Tiny);
    # its config parser checks them when MLA is on.
    if value <= 0 and not (key in _ZERO_OK and value == 0):
      raise ValueError(f"{source}: {path} = {value} must be a positive integer")
  for sub_path, sub in _sections(raw):
    heads, kv = sub.get("num_attention_heads"), sub.get("num_key_value_heads")
    width, head_dim = sub.get("hidden_size"), sub.get("head_dim")
    if _int(heads) and _int(width) and head_dim is None and width % heads:
      raise ValueError(f"{source}: {sub_path}hidden_size = {width} is not divisible by {sub_path}num_attention_heads "
                       f"= {heads} (and no head_dim is given)")
    if _int(heads) and _int(kv) and heads % kv:
      raise ValueError(f"{source}: {sub_path}num_attention_heads = {heads} is not divisible by "
                       f"{sub_path}num_key_value_heads = {kv}")
    # A patch size that does not divide the image size is fine: the patch convolution drops the remainder
    # (SigLIP-so400m: 384 px in 14 px patches, 27 x 27); one larger than the image leaves no patch.
    image, patch = sub.get("image_size"), sub.get("patch_size")
    if _int(image) and _int(patch) and image < patch:
      raise ValueError(f"{source}: {sub_path}image_size = {image} is smaller than {sub_path}patch_size = {patch}")


def _int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _sections(raw: dict, prefix: str = ""):
  yield prefix, raw
  for k, v in raw.items():
    if isinstance(v, dict):
      yield from _sections(v, f"{prefix}{k}.")


def param_bytes(shapes, itemsize: int) -> int:
  """Bytes of a shape tree (tuples as leaves)."""
  import jax

  from models.params import is_shape

  # A leaf is a tuple of ints; per-layer trees (tuples of dicts, e.g. MoE or Q-Former layers) are walked into.
  leaves = jax.tree.leaves(shapes, is_leaf=is_shape)
  return int(sum(int(np.prod(s, dtype=np.float64)) for s in leaves) * itemsize)


def check_param_memory(shapes, itemsize: int, source: str, available: int | None = None) -> None:
  """Refuses a config whose parameters alone exceed the memory at hand (before anything is allocated)."""
  from air_jax.limits import available_memory_bytes

  need = param_bytes(shapes, itemsize)
  have = available_memory_bytes() if available is None else available
  if have is not None and need > have:
    raise ValueError(f"{source} describes {need / 2**30:.1f} GiB of parameters at {itemsize} bytes each, more than "
                     f"the {have / 2**30:.1f} GiB available; check num_hidden_layers and the sizes, or load it "
                     "sharded over several devices (air_jax.sharding, python -m air_jax.plan)")
