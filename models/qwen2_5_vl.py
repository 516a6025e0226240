"""Qwen2.5-VL (transformers `Qwen2_5_VLForConditionalGeneration`): window ViT -> merger -> Qwen2 decoder, M-RoPE.

Params: {"visual": models.qwen_vision params, "language_model": decoder params (models.llama names),
         "lm_head"?: {"weight"}}.
Positions are multimodal ([3, B, T]: temporal, height, width) and follow transformers' `get_rope_index` for
images: text tokens count up on all three rows; an image run of (t, h, w) merged units takes
(start + t_idx, start + h_idx, start + w_idx) and the text after it resumes at start + max(h, w) (t = 1). While
decoding, a new token's position is (number of real tokens before it) + `rope_delta` of its row.
Video inputs are not supported yet (the video token raises).
Legend: B batch, T tokens, N patches, M merged image features, E text width, V vocab.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from models import llama, qwen_vision
from models import family as family_lib
from models.llama_family import LlamaDecoderFamily
from models.config import TextConfig, _check, tied_flag
from models.vl_inputs import encode_turns, merge_rows
from models.qwen_text import decoder_param_shapes, qwen_text_config_from_dict
from models.qwen_vision import QwenVisionConfig
from models.spec import RectificationSpec


@dataclasses.dataclass(frozen=True)
class Qwen25VLConfig:
  vision: QwenVisionConfig = QwenVisionConfig()
  text: TextConfig = TextConfig()
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653

  @property
  def merge_unit(self) -> int:
    return self.vision.spatial_merge_size**2

  @property
  def dims(self):
    """The language decoder's dims (models.family.DecoderDims)."""
    return self.text.dims


def config_from_dict(d: dict) -> Qwen25VLConfig:
  """Parses a Qwen2.5-VL `config.json` dict: flat (4.x, text fields at the top) or nested `text_config` (5.x)."""
  model_type = d.get("model_type", "qwen2_5_vl")
  _check(model_type == "qwen2_5_vl", "model_type", model_type, "'qwen2_5_vl'")
  if "vision_config" not in d:
    raise ValueError("config is missing the field 'vision_config'")
  text = dict(d.get("text_config") or {})
  for k, v in d.items():  # 4.x keeps the text fields at the top level
    if k not in ("text_config", "vision_config", "model_type"):
      text.setdefault(k, v)
  text["model_type"] = "qwen2_5_vl_text"
  # Tied when the top level or (pre-5.x saves) the text config says so; a stored, different head wins (tied_flag).
  tc = qwen_text_config_from_dict(dict(text, tie_word_embeddings=tied_flag(d)))
  _check(tc.mrope_section is not None, "text_config.rope_parameters.mrope_section", None,
         "the multimodal RoPE sections (e.g. [16, 24, 24])")
  vc = qwen_vision.vision_config_from_dict(d["vision_config"])
  _check(vc.out_hidden_size == tc.hidden_size, "vision_config.out_hidden_size", vc.out_hidden_size,
         f"the text hidden_size {tc.hidden_size}")
  get = lambda k, default: int(d.get(k, text.get(k, default)))
  return Qwen25VLConfig(vision=vc, text=tc, image_token_id=get("image_token_id", 151655),
                        video_token_id=get("video_token_id", 151656),
                        vision_start_token_id=get("vision_start_token_id", 151652),
                        vision_end_token_id=get("vision_end_token_id", 151653))


def load_config(path: str) -> Qwen25VLConfig:
  file = os.path.join(path, "config.json") if os.path.isdir(path) else path
  with open(file) as f:
    return config_from_dict(json.load(f))


def param_shapes(config: Qwen25VLConfig) -> dict:
  tree = {"visual": qwen_vision.param_shapes(config.vision), "language_model": decoder_param_shapes(config.text)}
  if not config.text.tie_word_embeddings:
    tree["lm_head"] = {"weight": (config.text.vocab_size, config.text.hidden_size)}
  return tree


def num_image_tokens(config: Qwen25VLConfig, image_grid_thw) -> np.ndarray:
  """Image tokens (merged features) of each image: t * h * w / merge^2."""
  grid = qwen_vision.check_grid(config.vision, image_grid_thw)
  return grid.prod(-1) // config.merge_unit


def check_image_tokens(config: Qwen25VLConfig, input_ids, image_grid_thw) -> None:
  """Raises unless every image-token run matches its image's feature count (concrete ids only)."""
  if isinstance(input_ids, jax.core.Tracer):
    return
  ids = np.asarray(input_ids)
  if np.any(ids == config.video_token_id):
    raise ValueError(f"input_ids hold video tokens (id {config.video_token_id}); video inputs are not supported yet "
                     "(images only)")
  per_image = num_image_tokens(config, image_grid_thw)
  n_tok, n_feat = int(np.sum(ids == config.image_token_id)), int(per_image.sum())
  if n_tok != n_feat:
    raise ValueError(
        f"input_ids hold {n_tok} image tokens (id {config.image_token_id}) but image_grid_thw {per_image.tolist()} "
        f"gives {n_feat} features; the prompt and the images do not match (build them with the same processor)")


def rope_index(config: Qwen25VLConfig, input_ids, attention_mask, image_grid_thw) -> tuple[np.ndarray, np.ndarray]:
  """transformers' `get_rope_index` for images: positions [3, B, T] int32 (0 at padding) and rope_deltas [B]."""
  ids = np.asarray(input_ids)
  mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
  grids = iter(qwen_vision.check_grid(config.vision, image_grid_thw) if image_grid_thw is not None else ())
  m = config.vision.spatial_merge_size
  b, t = ids.shape
  positions = np.zeros((3, b, t), np.int32)
  deltas = np.zeros((b,), np.int32)
  for row in range(b):
    valid = mask[row].astype(bool)
    is_img = ids[row][valid] == config.image_token_id
    pieces, cur, i = [], 0, 0
    while i < len(is_img):
      j = i
      while j < len(is_img) and is_img[j] == is_img[i]:
        j += 1
      if not is_img[i]:
        pieces.append(np.broadcast_to(np.arange(j - i) + cur, (3, j - i)))
        cur += j - i
        i = j
        continue
      # A run of image tokens may hold several adjacent images: take grids until the run is consumed.
      while i < j:
        gt, gh, gw = (int(x) for x in next(grids))
        gh, gw = gh // m, gw // m
        tt, hh, ww = np.meshgrid(np.arange(gt), np.arange(gh), np.arange(gw), indexing="ij")
        pieces.append(np.stack([tt + cur, hh + cur, ww + cur]).reshape(3, -1))
        cur += max(gh, gw)
        i += gt * gh * gw
      if i != j:
        raise ValueError("an image-token run does not end at an image boundary; the prompt and image_grid_thw do not "
                         "match")
    if pieces:
      pos = np.concatenate(pieces, 1)
      positions[:, row, valid] = pos
      deltas[row] = pos.max() + 1 - len(is_img)
  return positions, deltas


def images_per_row(config: Qwen25VLConfig, input_ids) -> list[int]:
  """Images of each row: runs of image tokens (the chat template wraps every image in vision start/end)."""
  is_img = np.asarray(input_ids) == config.image_token_id
  starts = is_img & ~np.concatenate([np.zeros_like(is_img[:, :1]), is_img[:, :-1]], 1)
  return starts.sum(1).tolist()


def vision_inputs(config: Qwen25VLConfig, pixel_values, image_grid_thw, images_per_example) -> dict:
  """The processor's flat patches and grids, regrouped per example with a leading batch axis (numpy).

  pixels [B, N, C*Tp*p*p] (zero padded), the vision plan arrays (models.qwen_vision.batch_plans) and, per merged
  unit in image order, unit_thw [B, M, 3] (its t, h, w index inside its image) and unit_adv [B, M] (the position
  advance of its image, max(h, w) merged units, on the image's last unit; 0 elsewhere).
  """
  vc = config.vision
  grid = qwen_vision.check_grid(vc, image_grid_thw)
  pixel_values = np.asarray(pixel_values, np.float32)
  if sum(images_per_example) != len(grid):
    raise ValueError(f"the prompts hold {sum(images_per_example)} images but image_grid_thw describes {len(grid)}")
  if pixel_values.shape[0] != int(grid.prod(-1).sum()):
    raise ValueError(f"pixel_values holds {pixel_values.shape[0]} patches but image_grid_thw describes "
                     f"{int(grid.prod(-1).sum())}; pass the image_grid_thw the processor returned with these pixels")
  m = vc.spatial_merge_size
  bounds = np.cumsum([0] + list(images_per_example))
  groups = [grid[bounds[i]:bounds[i + 1]] for i in range(len(images_per_example))]
  groups = [g if len(g) else np.array([[1, m, m]]) for g in groups]  # text-only rows: one dummy image, unused
  out = qwen_vision.batch_plans(vc, groups)
  n, mx = out["perm"].shape[1], out["unperm"].shape[1]
  pixels = np.zeros((len(groups), n, pixel_values.shape[1]), np.float32)
  thw = np.zeros((len(groups), mx, 3), np.int32)
  adv = np.zeros((len(groups), mx), np.int32)
  offsets = np.cumsum([0] + grid.prod(-1).tolist())
  for b, g in enumerate(groups):
    if images_per_example[b]:
      lo, hi = offsets[bounds[b]], offsets[bounds[b + 1]]
      pixels[b, : hi - lo] = pixel_values[lo:hi]
    u = 0
    for gt, gh, gw in g.tolist():
      gh, gw = gh // m, gw // m
      tt, hh, ww = np.meshgrid(np.arange(gt), np.arange(gh), np.arange(gw), indexing="ij")
      k = gt * gh * gw
      thw[b, u:u + k] = np.stack([tt, hh, ww], -1).reshape(-1, 3)
      adv[b, u + k - 1] = max(gh, gw)
      u += k
  out.update(pixels=pixels, unit_thw=thw, unit_adv=adv)
  return out


def image_features(params, config: Qwen25VLConfig, vision: dict) -> jax.Array:
  """Per-example merged features [B, M, E] (padding units at the end of each row)."""
  plan_keys = ("rot_pos", "perm", "unperm", "window_idx", "window_valid", "window_inv", "full_idx", "full_valid",
               "full_inv")
  one = lambda px, plan: qwen_vision.forward(params["visual"], config.vision, px, plan)
  return jax.vmap(one)(vision["pixels"], {k: vision[k] for k in plan_keys})


def embed(params, config: Qwen25VLConfig, input_ids, vision):
  embeds = llama.embed_tokens(params["language_model"], input_ids)
  if vision is None:
    return embeds
  return merge_rows(embeds, input_ids, image_features(params, config, vision), config.image_token_id)


def positions(config: Qwen25VLConfig, input_ids, attention_mask, vision) -> jax.Array:
  """transformers' get_rope_index for images, traced: [3, B, T] int32 (0 at padding).

  Every real token advances the running position by 1, except image tokens: an image's run advances it by
  max(h, w) merged units at its last token. A text token sits at the running position on all three axes; an image
  token at (running position at its image's start) + (t, h, w) of its unit.
  """
  valid = attention_mask.astype(bool)
  if vision is None:
    pos = jnp.where(valid, jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)
    return jnp.broadcast_to(pos[None], (3,) + pos.shape)
  is_img = (input_ids == config.image_token_id) & valid
  unit = jnp.clip(jnp.cumsum(is_img, axis=1) - 1, 0, vision["unit_adv"].shape[1] - 1)  # [B, T]
  adv_img = jnp.take_along_axis(vision["unit_adv"], unit, axis=1)
  adv = jnp.where(is_img, adv_img, valid.astype(jnp.int32))
  base = jnp.cumsum(adv, axis=1) - adv  # exclusive: the running position before the token
  # Within an image only its last unit advances, so `base` is the image's start on all of its tokens.
  thw = jnp.take_along_axis(vision["unit_thw"], unit[..., None], axis=1)  # [B, T, 3]
  pos = base[None] + jnp.where(is_img[None], jnp.moveaxis(thw, -1, 0), 0)
  return jnp.where(valid[None], pos, 0).astype(jnp.int32)


def forward(
    params,
    config: Qwen25VLConfig,
    input_ids,
    pixel_values,
    image_grid_thw=None,
    *,
    attention_mask=None,
    spec: RectificationSpec | None = None,
    output_attentions: bool = False,
    position_ids=None,
) -> dict:
  """Full (uncached) forward pass on the processor's outputs.

  Args:
    input_ids: [B, T] with `<|image_pad|>` runs already expanded (one token per merged feature).
    pixel_values: flat patches [N, C * Tp * p * p] of every image in order, or None (text only).
    image_grid_thw: [I, 3] (t, h, w in patches) per image, as the processor returns it.
    attention_mask: [B, T] (left padding allowed). position_ids: [3, B, T] (default: `positions`).

  Returns:
    {"logits": [B, T, V] float32} plus "attentions" [L, B, H, T, T] when asked.
  """
  params = getattr(params, "params", params)
  ids_np = np.asarray(input_ids)
  mask_np = np.ones_like(ids_np) if attention_mask is None else np.asarray(attention_mask)
  vision = None
  if pixel_values is not None:
    if image_grid_thw is None:
      raise ValueError("pixel_values given without image_grid_thw; pass the processor's image_grid_thw")
    check_image_tokens(config, ids_np, image_grid_thw)
    vision = vision_inputs(config, pixel_values, image_grid_thw, images_per_row(config, ids_np))
  elif np.any(ids_np == config.image_token_id):
    raise ValueError("input_ids hold image tokens but no pixel_values were given")
  pos = None if position_ids is None else jnp.asarray(position_ids)
  return family_lib.forward_jit(params, config, jnp.asarray(ids_np), vision, attention_mask=jnp.asarray(mask_np),
                                spec=spec, output_attentions=output_attentions, position_ids=pos)


# Checkpoint key layouts (longest prefixes first: the first match wins).
#   original Qwen release / transformers < 4.52: visual.*, model.* (the decoder), lm_head.*
#   transformers >= 4.52 and 5.x:              model.visual.*, model.language_model.*, lm_head.*
KEY_PREFIXES = (
    ("model.visual.", "visual."),
    ("model.language_model.", "language_model."),
    ("visual.", "visual."),
    ("model.", "language_model."),
    ("lm_head.", "lm_head."),
)


class Qwen25VLFamily(LlamaDecoderFamily):
  """Qwen2.5-VL: window-attention ViT + merger -> Qwen2 decoder with multimodal RoPE (images; no video yet)."""

  name = "qwen2_5_vl"
  max_images_per_prompt = None
  wraps_images = True
  model_types = ("qwen2_5_vl",)
  architectures = ("Qwen2_5_VLForConditionalGeneration",)
  config_types = (Qwen25VLConfig,)
  key_prefixes = KEY_PREFIXES
  stack_renames = (("visual.blocks.", "visual.layers."),)  # stacked like decoder layers

  def parse_config(self, raw):
    return config_from_dict(raw)

  def param_shapes(self, config):
    return param_shapes(config)

  def load_processor(self, path):
    from convert.hf_qwen2_5_vl import load_processor

    return load_processor(path)

  def prepare_inputs(self, processor, config, images, prompts, bucket):
    enc, ids, mask, groups = encode_turns(processor, images, prompts, bucket)
    if "image_grid_thw" not in enc:  # no prompt holds an image (text-only prompts): empty image inputs
      vc = config.vision
      enc["image_grid_thw"] = np.zeros((0, 3), np.int64)
      enc["pixel_values"] = np.zeros((0, vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2), np.float32)
    check_image_tokens(config, ids, enc["image_grid_thw"])
    vision = vision_inputs(config, enc["pixel_values"], enc["image_grid_thw"], [len(g) for g in groups])
    return {"input_ids": ids, "attention_mask": mask, "vision": vision}

  def embed(self, params, config, input_ids, attention_mask, vision):
    return embed(params, config, input_ids, vision)

  def positions(self, config, input_ids, attention_mask, vision):
    return positions(config, input_ids, attention_mask, vision)

  def decode_positions(self, config, next_position):
    # Text tokens advance all three axes together; rope_deltas are inside next_position (max position + 1).
    return jnp.broadcast_to(next_position[None, :, None], (3, next_position.shape[0], 1))

  def map_pixels(self, config, vision, fn):
    """fn sees each time frame as its own pixel array [T * B, n, C * P * P] (n patch rows, frame-major): a still
    image's two identical frames (temporal_patch_size 2) then stay identical, as if the processor had been given
    the mapped image (e.g. VCD's one noised image), and a pixel-wise map reaches every patch."""
    if vision is None:
      return None
    pix = vision["pixels"]  # [B, n, C * T * P * P], the processor's (C, T, P, P) order within a patch row
    b, n, d = pix.shape
    c, t = config.vision.in_channels, config.vision.temporal_patch_size
    frames = pix.reshape(b, n, c, t, d // (c * t)).transpose(3, 0, 1, 2, 4).reshape(t * b, n, d // t)
    mapped = fn(frames).reshape(t, b, n, c, d // (c * t)).transpose(1, 2, 3, 0, 4).reshape(b, n, d)
    return dict(vision, pixels=mapped)

  def max_image_tokens(self, config):
    return qwen_vision.PLAN_IMAGE_TOKENS

  def partition_rules(self, config):
    # Megatron split over the "model" mesh axis (air_jax.sharding); specs of the per-layer [out, in] tensors. The
    # fused vision qkv stays replicated (a row split would cut across q, k and v).
    col, row, col_b = ("model", None), (None, "model"), ("model",)
    return (
        (r"^language_model\.layers\.(self_attn\.(q|k|v)_proj|mlp\.(gate|up)_proj)\.weight$", col),
        (r"^language_model\.layers\.self_attn\.(q|k|v)_proj\.bias$", col_b),
        (r"^language_model\.layers\.(self_attn\.o_proj|mlp\.down_proj)\.weight$", row),
        (r"^language_model\.embed_tokens\.weight$", col),
        (r"^lm_head\.weight$", col),
        (r"^visual\.layers\.mlp\.(gate|up)_proj\.weight$", col),
        (r"^visual\.layers\.mlp\.(gate|up)_proj\.bias$", col_b),
        (r"^visual\.layers\.(mlp\.down_proj|attn\.proj)\.weight$", row),
        (r"^visual\.merger\.mlp\.0\.weight$", col),
        (r"^visual\.merger\.mlp\.0\.bias$", col_b),
        (r"^visual\.merger\.mlp\.2\.weight$", row),
    )


FAMILY = family_lib.register(Qwen25VLFamily())
