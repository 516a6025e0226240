"""Frozen (static, hashable) model configs parsed from Hugging Face `config.json` files.

Field names follow transformers so that a reader can map them one to one. Only what the forward pass needs is
kept; unknown fields are ignored, unsupported values raise a ValueError that names the field.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from models.moe import Router

_ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "silu", "swish", "relu")
_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """CLIP ViT vision tower (transformers `CLIPVisionConfig`)."""

  hidden_size: int = 1024
  intermediate_size: int = 4096
  num_hidden_layers: int = 24
  num_attention_heads: int = 16
  num_channels: int = 3
  image_size: int = 336
  patch_size: int = 14
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class RopeConfig:
  """Rotary embedding parameters (transformers `rope_parameters` / legacy `rope_scaling`)."""

  rope_type: str = "default"
  rope_theta: float = 10000.0
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int | None = None


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """Llama decoder (transformers `LlamaConfig`)."""

  vocab_size: int = 32064
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int = 32
  head_dim: int = 128
  hidden_act: str = "silu"
  rms_norm_eps: float = 1e-5
  max_position_embeddings: int = 4096
  attention_bias: bool = False
  mlp_bias: bool = False
  tie_word_embeddings: bool = False
  rope: RopeConfig = RopeConfig()
  bos_token_id: int | None = 1
  eos_token_id: tuple[int, ...] = (2,)
  pad_token_id: int | None = None
  # Decoder variants beyond Llama (defaults = Llama). qkv_bias: biases on q/k/v only (Qwen2); qk_norm: RMSNorm of
  # each head's q and k over head_dim before RoPE (Qwen3); mrope_section: multimodal RoPE, the half head_dim split
  # into (temporal, height, width) sections read from positions [3, B, T] (Qwen2-VL / Qwen2.5-VL).
  qkv_bias: bool = False
  qk_norm: bool = False
  mrope_section: tuple[int, ...] | None = None
  sliding_window: int | None = None  # Mistral: a query sees keys at most sliding_window - 1 slots back
  # Sparse MoE feed-forward (Qwen3-MoE): the layers in `sparse_layers` replace the dense MLP by `moe` routed experts
  # of width moe_intermediate_size (models.moe); the others keep the dense MLP of intermediate_size. None: dense.
  moe: Router | None = None
  moe_intermediate_size: int = 0
  sparse_layers: tuple[int, ...] = ()
  model_type: str = "llama"

  def is_sparse(self, layer: int) -> bool:
    """Whether decoder layer `layer` has the routed experts instead of the dense MLP."""
    return layer in self.sparse_layers

  @property
  def mixed_layers(self) -> bool:
    """Some layers sparse and some dense: their params differ in shape, so the layers are a tuple of per-layer
    trees (never stacked)."""
    return 0 < len(self.sparse_layers) < self.num_hidden_layers

  @property
  def dims(self):
    from models.family import DecoderDims

    return DecoderDims(num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                       num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim,
                       hidden_size=self.hidden_size, vocab_size=self.vocab_size, eos_token_id=self.eos_token_id,
                       max_position_embeddings=self.max_position_embeddings)


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
  """LLaVA-1.5 style model: CLIP vision tower, MLP projector, Llama decoder."""

  vision: VisionConfig = VisionConfig()
  text: TextConfig = TextConfig()
  image_token_id: int = 32000
  vision_feature_layer: int | tuple[int, ...] = -2
  vision_feature_select_strategy: str = "default"
  projector_hidden_act: str = "gelu"
  multimodal_projector_bias: bool = True

  @property
  def num_image_tokens(self) -> int:
    """Image tokens per image after feature selection (`default` drops CLS)."""
    return self.vision.num_patches + (1 if self.vision_feature_select_strategy == "full" else 0)

  @property
  def feature_layers(self) -> tuple[int, ...]:
    v = self.vision_feature_layer
    return (v,) if isinstance(v, int) else tuple(v)

  @property
  def dims(self):
    """The language decoder's dims (models.family.DecoderDims)."""
    return self.text.dims


def _check(cond: bool, field: str, value: Any, expected: str) -> None:
  if not cond:
    raise ValueError(f"config field {field!r} has unsupported value {value!r}; expected {expected}")


def _rope_from_dict(d: dict, default_theta: float, max_pos: int) -> RopeConfig:
  # transformers 5.x: `rope_parameters` (holds rope_theta); 4.x: `rope_theta` + optional `rope_scaling`.
  params = dict(d.get("rope_parameters") or {})
  legacy = d.get("rope_scaling") or {}
  for k, v in legacy.items():
    params.setdefault(k, v)
  if "type" in params and "rope_type" not in params:
    params["rope_type"] = params["type"]
  rope_type = params.get("rope_type", "default")
  _check(rope_type in _ROPE_TYPES, "text_config.rope_parameters.rope_type", rope_type, f"one of {_ROPE_TYPES}")
  theta = float(params.get("rope_theta", d.get("rope_theta", default_theta)))
  factor = float(params.get("factor", 1.0))
  if rope_type in ("linear", "dynamic", "llama3"):
    _check("factor" in params, "text_config.rope_parameters.factor", None, f"a number for rope_type {rope_type!r}")
  orig = params.get("original_max_position_embeddings")
  if rope_type == "llama3":
    _check(orig is not None, "text_config.rope_parameters.original_max_position_embeddings", orig, "an int")
  return RopeConfig(
      rope_type=rope_type,
      rope_theta=theta,
      factor=factor,
      low_freq_factor=float(params.get("low_freq_factor", 1.0)),
      high_freq_factor=float(params.get("high_freq_factor", 4.0)),
      original_max_position_embeddings=int(orig) if orig is not None else None,
  )


def vision_config_from_dict(d: dict) -> VisionConfig:
  model_type = d.get("model_type", "clip_vision_model")
  _check(model_type in ("clip_vision_model", "clip"), "vision_config.model_type", model_type,
         "'clip_vision_model' (CLIP ViT)")
  act = d.get("hidden_act", "quick_gelu")
  _check(act in _ACTIVATIONS, "vision_config.hidden_act", act, f"one of {_ACTIVATIONS}")
  return VisionConfig(
      hidden_size=int(d.get("hidden_size", 768)),
      intermediate_size=int(d.get("intermediate_size", 3072)),
      num_hidden_layers=int(d.get("num_hidden_layers", 12)),
      num_attention_heads=int(d.get("num_attention_heads", 12)),
      num_channels=int(d.get("num_channels", 3)),
      image_size=int(d.get("image_size", 224)),
      patch_size=int(d.get("patch_size", 32)),
      hidden_act=act,
      layer_norm_eps=float(d.get("layer_norm_eps", 1e-5)),
  )


def tied_flag(d: dict) -> bool:
  """Whether a composite config asks for a tied LM head: its top-level flag or (pre-5.x saves) its text config's.

  transformers' rules differ by family and version (5.x LLaVA and Qwen2.5-VL OR the two flags, LLaVA-NeXT reads
  the top level only, 4.x composites tied through the text model's own flag), and every version
  keeps a stored lm_head that differs from the embeddings. So air-jax ties when either flag says so and then lets
  the checkpoint decide (`convert.checkpoint.resolve_tied_head`): a stored, different head is used untied.
  """
  text = d.get("text_config") or {}
  return bool(d.get("tie_word_embeddings", False)) or bool(text.get("tie_word_embeddings", False))


def text_config_from_dict(d: dict, tie_default: bool = False) -> TextConfig:
  model_type = d.get("model_type", "llama")
  _check(model_type in ("llama", "mistral"), "text_config.model_type", model_type, "'llama' or 'mistral'")
  act = d.get("hidden_act", "silu")
  _check(act in _ACTIVATIONS, "text_config.hidden_act", act, f"one of {_ACTIVATIONS}")
  if model_type == "mistral":  # MistralConfig's defaults for fields a partial config.json leaves out
    d = {"intermediate_size": 14336, "num_key_value_heads": 8, "max_position_embeddings": 4096 * 32, **d}
  hidden = int(d.get("hidden_size", 4096))
  heads = int(d.get("num_attention_heads", 32))
  kv = d.get("num_key_value_heads") or heads
  _check(heads % int(kv) == 0, "text_config.num_key_value_heads", kv, f"a divisor of num_attention_heads={heads}")
  head_dim = d.get("head_dim") or hidden // heads
  max_pos = int(d.get("max_position_embeddings", 2048))
  eos = d.get("eos_token_id", 2)
  eos = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
  tie = d.get("tie_word_embeddings", tie_default)
  return TextConfig(
      vocab_size=int(d.get("vocab_size", 32000)),
      hidden_size=hidden,
      intermediate_size=int(d.get("intermediate_size", 11008)),
      num_hidden_layers=int(d.get("num_hidden_layers", 32)),
      num_attention_heads=heads,
      num_key_value_heads=int(kv),
      head_dim=int(head_dim),
      hidden_act=act,
      rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
      max_position_embeddings=max_pos,
      # transformers' Mistral layers have no biases whatever these fields say (a stray flag is ignored there too)
      attention_bias=model_type == "llama" and bool(d.get("attention_bias", False)),
      mlp_bias=model_type == "llama" and bool(d.get("mlp_bias", False)),
      tie_word_embeddings=bool(tie),
      rope=_rope_from_dict(d, 10000.0, max_pos),
      bos_token_id=d.get("bos_token_id", 1),
      eos_token_id=eos,
      pad_token_id=d.get("pad_token_id"),
      sliding_window=_sliding_window(d, model_type),
      model_type=model_type,
  )


def _sliding_window(d: dict, model_type: str) -> int | None:
  # transformers' Llama has no sliding window; Mistral applies `sliding_window` when it is set (null: none; a
  # missing field takes MistralConfig's default, 4096).
  w = d.get("sliding_window", 4096) if model_type == "mistral" else None
  if w is None:
    return None
  _check(isinstance(w, int) and w > 0, "text_config.sliding_window", w, "a positive int or null")
  return int(w)


def llava_config_from_dict(d: dict) -> LlavaConfig:
  """Parses a transformers LLaVA `config.json` dict (4.x and 5.x layouts)."""
  model_type = d.get("model_type", "llava")
  _check(model_type == "llava", "model_type", model_type, "'llava'")
  for key in ("vision_config", "text_config"):
    if key not in d:
      raise ValueError(f"config is missing the field {key!r}")
  strategy = d.get("vision_feature_select_strategy", "default")
  _check(strategy in ("default", "full"), "vision_feature_select_strategy", strategy, "'default' or 'full'")
  layer = d.get("vision_feature_layer", -2)
  layer = int(layer) if isinstance(layer, int) else tuple(int(x) for x in layer)
  vision = vision_config_from_dict(d["vision_config"])
  n_hidden = vision.num_hidden_layers + 1  # embeddings output + one per encoder layer
  for lyr in (layer,) if isinstance(layer, int) else layer:
    _check(-n_hidden <= lyr < n_hidden, "vision_feature_layer", layer, f"indices into {n_hidden} hidden states")
  act = d.get("projector_hidden_act", "gelu")
  _check(act in _ACTIVATIONS, "projector_hidden_act", act, f"one of {_ACTIVATIONS}")
  image_token = d.get("image_token_id", d.get("image_token_index", 32000))
  text = text_config_from_dict(dict(d["text_config"], tie_word_embeddings=tied_flag(d)))
  return LlavaConfig(
      vision=vision,
      text=text,
      image_token_id=int(image_token),
      vision_feature_layer=layer,
      vision_feature_select_strategy=strategy,
      projector_hidden_act=act,
      multimodal_projector_bias=bool(d.get("multimodal_projector_bias", True)),
  )


def load_llava_config(path: str) -> LlavaConfig:
  """Reads `config.json` from a checkpoint directory (or the file itself)."""
  file = os.path.join(path, "config.json") if os.path.isdir(path) else path
  if not os.path.exists(file):
    raise FileNotFoundError(f"no config.json at {file}")
  with open(file) as f:
    try:
      d = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{file} is not valid JSON: {e}") from e
  return llava_config_from_dict(d)
