"""InternVL (transformers `InternVLForConditionalGeneration`): InternViT -> pixel shuffle -> MLP -> Qwen2/Qwen3 decoder
(or Qwen3-MoE: InternVL3_5-30B-A3B-HF, InternVL3_5-241B-A28B-HF; see models.qwen_text).

Params: {"vision_tower": models.intern_vit params, "multi_modal_projector": {layer_norm, linear_1, linear_2},
         "language_model": decoder params (models.llama names), "lm_head"?: {"weight"}}.
Every tile (the processor's crops plus the thumbnail) gives (grid * downsample_ratio)^2 features; an image's
prompt run is `<img>` + that many `<IMG_CONTEXT>` per tile + `</img>`. Positions are 1D (cumsum of the mask).
Legend: B batch, T tokens, I tiles, P features per tile, E text width, V vocab.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from models import intern_vit, llama
from models import family as family_lib
from models.llama_family import LlamaDecoderFamily
from models.config import TextConfig, _check
from models.intern_vit import InternVisionConfig
from models.layers import activation, layer_norm, linear
from models.llava import positions_from_mask
from models.vl_inputs import encode_turns, merge_rows
from models.qwen_text import decoder_param_shapes, qwen_text_config_from_dict
from models.spec import RectificationSpec

_PROJ_LN_EPS = 1e-5  # nn.LayerNorm default in transformers' InternVLMultiModalProjector
# Planning figure (air_jax.plan): the processor's default max_patches (12) tiles plus the thumbnail.
PLAN_TILES = 13


@dataclasses.dataclass(frozen=True)
class InternVLConfig:
  vision: InternVisionConfig = InternVisionConfig()
  text: TextConfig = TextConfig()
  image_token_id: int = 151667
  image_seq_length: int = 256
  downsample_ratio: float = 0.5
  projector_hidden_act: str = "gelu"
  vision_feature_layer: int = -1

  @property
  def shuffle(self) -> int:
    """Side of the square of patches folded into one feature (2 for downsample_ratio 0.5)."""
    return int(round(1 / self.downsample_ratio))

  @property
  def tokens_per_tile(self) -> int:
    return (self.vision.grid // self.shuffle) ** 2

  @property
  def dims(self):
    """The language decoder's dims (models.family.DecoderDims)."""
    return self.text.dims


def config_from_dict(d: dict) -> InternVLConfig:
  model_type = d.get("model_type", "internvl")
  _check(model_type == "internvl", "model_type", model_type, "'internvl'")
  for key in ("vision_config", "text_config"):
    if key not in d:
      raise ValueError(f"config is missing the field {key!r}")
  strategy = d.get("vision_feature_select_strategy", "default")
  _check(strategy == "default", "vision_feature_select_strategy", strategy,
         "'default' (the CLS token is dropped so that the patches form a square grid)")
  vision = intern_vit.vision_config_from_dict(d["vision_config"])
  text_d = d["text_config"]
  # transformers' InternVLConfig defaults to a tied head when the top-level flag is unset, but keeps a stored
  # lm_head that differs from the embeddings (it warns). InternVL-HF conversions leave the top-level flag unset
  # and carry the language model's own flag in text_config (8B: false, head stored; 1B: true, none stored), so
  # that flag sizes the model from config.json alone; on load the checkpoint decides
  # (convert.checkpoint.resolve_tied_head: a tied config whose checkpoint stores a different head is untied).
  tie = bool(d.get("tie_word_embeddings", text_d.get("tie_word_embeddings", True)))
  text = qwen_text_config_from_dict(dict(text_d, tie_word_embeddings=tie))
  ratio = float(d.get("downsample_ratio", 0.5))
  s = int(round(1 / ratio))
  _check(abs(1 / s - ratio) < 1e-9 and vision.grid % s == 0, "downsample_ratio", ratio,
         f"1/k for an integer k dividing the patch grid {vision.grid}")
  layer = d.get("vision_feature_layer", -1)
  _check(isinstance(layer, int) and -(vision.num_hidden_layers + 1) <= layer <= vision.num_hidden_layers,
         "vision_feature_layer", layer, f"one index into {vision.num_hidden_layers + 1} hidden states")
  act = d.get("projector_hidden_act", "gelu")
  activation(act)
  cfg = InternVLConfig(vision=vision, text=text, image_token_id=int(d.get("image_token_id", 151667)),
                       image_seq_length=int(d.get("image_seq_length", 256)), downsample_ratio=ratio,
                       projector_hidden_act=act, vision_feature_layer=int(layer))
  return cfg


def load_config(path: str) -> InternVLConfig:
  file = os.path.join(path, "config.json") if os.path.isdir(path) else path
  with open(file) as f:
    return config_from_dict(json.load(f))


def param_shapes(config: InternVLConfig) -> dict:
  wide = config.vision.hidden_size * config.shuffle**2
  h = config.text.hidden_size
  tree = {"vision_tower": intern_vit.param_shapes(config.vision),
          "multi_modal_projector": {"layer_norm": {"weight": (wide,), "bias": (wide,)},
                                    "linear_1": {"weight": (h, wide), "bias": (h,)},
                                    "linear_2": {"weight": (h, h), "bias": (h,)}},
          "language_model": decoder_param_shapes(config.text)}
  if not config.text.tie_word_embeddings:
    tree["lm_head"] = {"weight": (config.text.vocab_size, h)}
  return tree


def pixel_shuffle(x: jax.Array, s: int) -> jax.Array:
  """transformers' InternVL pixel shuffle with scale 1/s: [B, n, n, C] -> [B, n/s, n/s, C*s*s]."""
  b, n, _, c = x.shape
  x = x.reshape(b, n, n // s, c * s).transpose(0, 2, 1, 3)
  x = x.reshape(b, n // s, n // s, c * s * s).transpose(0, 2, 1, 3)
  return x


def image_features(params: dict, config: InternVLConfig, pixel_values: jax.Array) -> jax.Array:
  """Tiles pixel_values [I, C, H, W] -> projected features [I, P, E]."""
  vc = config.vision
  layer = config.vision_feature_layer
  if layer == -1:
    _, feats = intern_vit.forward(params["vision_tower"], vc, pixel_values)
  else:
    idx = layer % (vc.num_hidden_layers + 1)
    hs, _ = intern_vit.forward(params["vision_tower"], vc, pixel_values, num_layers=max(idx, 1))
    feats = hs[idx]
  feats = feats[:, 1:]
  b, g = feats.shape[0], vc.grid
  feats = pixel_shuffle(feats.reshape(b, g, g, -1), config.shuffle).reshape(b, config.tokens_per_tile, -1)
  proj = params["multi_modal_projector"]
  feats = layer_norm(proj["layer_norm"], feats, _PROJ_LN_EPS)
  feats = activation(config.projector_hidden_act)(linear(proj["linear_1"], feats))
  return linear(proj["linear_2"], feats)


def check_image_tokens(config: InternVLConfig, input_ids, num_tiles: int) -> None:
  if isinstance(input_ids, jax.core.Tracer):
    return
  n_tok = int(np.sum(np.asarray(input_ids) == config.image_token_id))
  n_feat = num_tiles * config.tokens_per_tile
  if n_tok != n_feat:
    raise ValueError(
        f"input_ids hold {n_tok} image tokens (id {config.image_token_id}) but {num_tiles} tile(s) give {n_feat} "
        f"features ({config.tokens_per_tile} per tile); the prompt and pixel_values do not match (build both with "
        "the same processor)")


def tiles_per_row(config: InternVLConfig, input_ids) -> list[int]:
  """Tiles of each row, from its image-token count."""
  counts = (np.asarray(input_ids) == config.image_token_id).sum(1)
  if np.any(counts % config.tokens_per_tile):
    raise ValueError(f"a row holds {counts.tolist()} image tokens, not a multiple of {config.tokens_per_tile} per "
                     "tile; the prompt and the images do not match (build them with the same processor)")
  return (counts // config.tokens_per_tile).tolist()


def vision_inputs(config: InternVLConfig, pixel_values, tiles_per_example) -> dict:
  """The processor's tiles (the whole batch concatenated) regrouped per example: {"pixels": [B, I, C, H, W]},
  zero tiles after each row's real ones (their features are never read)."""
  pixel_values = np.asarray(pixel_values, np.float32)
  if sum(tiles_per_example) != pixel_values.shape[0]:
    raise ValueError(f"the prompts' image tokens ask for {sum(tiles_per_example)} tiles ({config.tokens_per_tile} "
                     f"tokens each) but pixel_values holds {pixel_values.shape[0]}; the prompt and pixel_values do "
                     "not match (build both with the same processor)")
  out = np.zeros((len(tiles_per_example), max(max(tiles_per_example), 1)) + pixel_values.shape[1:], np.float32)
  start = 0
  for b, n in enumerate(tiles_per_example):
    out[b, :n] = pixel_values[start:start + n]
    start += n
  return {"pixels": out}


def embed(params, config: InternVLConfig, input_ids, vision):
  embeds = llama.embed_tokens(params["language_model"], input_ids)
  if vision is None:
    return embeds
  px = vision["pixels"]
  b, i = px.shape[:2]
  feats = image_features(params, config, px.reshape((b * i,) + px.shape[2:]))
  feats = feats.reshape(b, i * config.tokens_per_tile, -1)
  return merge_rows(embeds, input_ids, feats, config.image_token_id)


def forward(
    params,
    config: InternVLConfig,
    input_ids,
    pixel_values,
    *,
    attention_mask=None,
    spec: RectificationSpec | None = None,
    output_attentions: bool = False,
    position_ids=None,
) -> dict:
  """Full (uncached) forward pass on the processor's outputs.

  Args:
    input_ids: [B, T] with the image runs already expanded by the processor.
    pixel_values: tiles [I, C, H, W] of the whole batch in prompt order (the processor concatenates them), or None.
    attention_mask: [B, T] (left padding allowed). position_ids: [B, T] (default: cumsum of the mask - 1).

  Returns:
    {"logits": [B, T, V] float32} plus "attentions" [L, B, H, T, T] when asked.
  """
  params = getattr(params, "params", params)
  ids = np.asarray(input_ids)
  vision = None
  if pixel_values is not None:
    check_image_tokens(config, ids, pixel_values.shape[0])
    vision = vision_inputs(config, pixel_values, tiles_per_row(config, ids))
  elif np.any(ids == config.image_token_id):
    raise ValueError("input_ids hold image tokens but no pixel_values were given")
  mask = jnp.ones_like(jnp.asarray(ids)) if attention_mask is None else jnp.asarray(attention_mask)
  if position_ids is None:
    position_ids = positions_from_mask(mask)
  return family_lib.forward_jit(params, config, jnp.asarray(ids), vision, attention_mask=mask, spec=spec,
                                output_attentions=output_attentions, position_ids=jnp.asarray(position_ids))


# Checkpoint key layouts (longest prefixes first: the first match wins).
#   transformers >= 4.52 and 5.x: model.vision_tower.*, model.multi_modal_projector.*, model.language_model.*,
#                                 lm_head.*
#   transformers 4.5x (pre-refactor): vision_tower.*, multi_modal_projector.*, language_model.model.*,
#                                     language_model.lm_head.*
# (OpenGVLab's original remote-code checkpoints, without `-HF`, have another layout and fused qkv; convert them
# with OpenGVLab's script first.)
KEY_PREFIXES = (
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", "language_model."),
    ("language_model.model.", "language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.", "vision_tower."),
    ("multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "lm_head."),
)


class InternVLFamily(LlamaDecoderFamily):
  """InternVL (-HF): InternViT -> pixel shuffle -> MLP -> Qwen2/Qwen3/Qwen3-MoE decoder; dynamic tiles with a
  thumbnail."""

  name = "internvl"
  max_images_per_prompt = None
  wraps_images = True
  model_types = ("internvl",)
  architectures = ("InternVLForConditionalGeneration",)
  config_types = (InternVLConfig,)
  key_prefixes = KEY_PREFIXES
  stack_renames = (("vision_tower.encoder.layer.", "vision_tower.encoder.layers."),)  # stacked like decoder layers

  def parse_config(self, raw):
    return config_from_dict(raw)

  def load_params(self, path, config, dtype, sharding=None):
    if config.text.moe is None:
      return super().load_params(path, config, dtype, sharding)
    # Qwen3-MoE: experts are stacked from per-expert keys or split from fused ones, which the one-key-per-slice
    # streaming loader cannot do; the filled numpy tree is then placed (convert.tree_fill.place).
    from convert.hf_internvl import load_moe_params
    from convert.tree_fill import place

    return place(load_moe_params(path, config, dtype), sharding)

  def param_shapes(self, config):
    return param_shapes(config)

  def load_processor(self, path):
    from convert.hf_internvl import load_processor

    return load_processor(path)

  def prepare_inputs(self, processor, config, images, prompts, bucket):
    enc, ids, mask, groups = encode_turns(processor, images, prompts, bucket)
    if "pixel_values" not in enc:  # no prompt holds an image (text-only prompts): empty image inputs
      s = config.vision.image_size
      enc["pixel_values"], enc["num_patches"] = np.zeros((0, 3, s, s), np.float32), np.zeros((0,), np.int64)
    check_image_tokens(config, ids, enc["pixel_values"].shape[0])
    tiles = np.asarray(enc["num_patches"]).tolist()
    bounds = np.cumsum([0] + [len(g) for g in groups])
    per_example = [sum(tiles[bounds[i]:bounds[i + 1]]) for i in range(len(groups))]
    return {"input_ids": ids, "attention_mask": mask,
            "vision": vision_inputs(config, enc["pixel_values"], per_example)}

  def embed(self, params, config, input_ids, attention_mask, vision):
    return embed(params, config, input_ids, vision)

  def map_pixels(self, config, vision, fn):
    return None if vision is None else dict(vision, pixels=fn(vision["pixels"]))

  def max_vision_tiles(self, config):
    return PLAN_TILES

  def max_image_tokens(self, config):
    return PLAN_TILES * config.tokens_per_tile

  def supports_layer_reuse(self, config) -> bool:
    # The reuse path stacks the layers (models.llama_parts.stacked): dense and MoE layers mixed cannot be.
    return super().supports_layer_reuse(config) and not config.text.mixed_layers

  def partition_rules(self, config):
    # Megatron split over the "model" mesh axis (air_jax.sharding); specs of the per-layer [out, in] tensors
    # (`layers.` or, for mixed dense/MoE decoders, `layers.{i}.`). Qwen3-MoE experts are split inside each expert
    # like a dense MLP (gate/up [X, I, E] on I, down [X, E, I] on I): every device routes every token exactly as one
    # device does; the router stays whole.
    col, row, col_b = ("model", None), (None, "model"), ("model",)
    lyr = r"^language_model\.layers\.(\d+\.)?"
    return (
        (lyr + r"(self_attn\.(q|k|v)_proj|mlp\.(gate|up)_proj)\.weight$", col),
        (lyr + r"self_attn\.(q|k|v)_proj\.bias$", col_b),
        (lyr + r"(self_attn\.o_proj|mlp\.down_proj)\.weight$", row),
        (lyr + r"mlp\.experts\.(gate|up)_proj\.weight$", (None, "model", None)),
        (lyr + r"mlp\.experts\.down_proj\.weight$", (None, None, "model")),
        (r"^language_model\.embed_tokens\.weight$", col),
        (r"^lm_head\.weight$", col),
        (r"^vision_tower\.encoder\.layers\.(attention\.(q|k|v)_proj|mlp\.fc1)\.weight$", col),
        (r"^vision_tower\.encoder\.layers\.(attention\.(q|k|v)_proj|mlp\.fc1)\.bias$", col_b),
        (r"^vision_tower\.encoder\.layers\.(attention\.projection_layer|mlp\.fc2)\.weight$", row),
        (r"^multi_modal_projector\.linear_1\.weight$", col),
        (r"^multi_modal_projector\.linear_1\.bias$", col_b),
        (r"^multi_modal_projector\.linear_2\.weight$", row),
    )


FAMILY = family_lib.register(InternVLFamily())
