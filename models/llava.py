"""LLaVA-1.5 (transformers `LlavaForConditionalGeneration`): CLIP tower -> projector -> Llama decoder.

Params: {"vision_tower": clip params, "multi_modal_projector": {linear_1, linear_2},
         "language_model": llama params, "lm_head"?: {"weight"}}.
Legend: B batch, T tokens, I images, P image tokens per image, E text width, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from models import chat, clip, llama
from models import family as family_lib
from models.llama_family import LlamaDecoderFamily
from models.config import LlavaConfig, llava_config_from_dict
from models.layers import activation, linear
from models.segments import TEXT, segment_ids
from models.spec import AttnContext, RectificationSpec


def image_features(params: dict, config: LlavaConfig, pixel_values: jax.Array) -> jax.Array:
  """pixel_values [I, C, H, W] -> projected features [I, P, E]."""
  vc = config.vision
  n_hidden = vc.num_hidden_layers + 1
  idx = [layer % n_hidden for layer in config.feature_layers]
  hs = clip.forward(params["vision_tower"], vc, pixel_values, num_layers=max(idx))
  pool = [hs[i] for i in idx]
  if config.vision_feature_select_strategy == "default":
    pool = [x[:, 1:] for x in pool]
  feats = jnp.concatenate(pool, axis=-1)
  proj = params["multi_modal_projector"]
  feats = activation(config.projector_hidden_act)(linear(proj["linear_1"], feats))
  return linear(proj["linear_2"], feats)


def check_image_tokens(config: LlavaConfig, input_ids, num_images: int) -> None:
  """Raises if the number of image tokens in input_ids is not num_images x tokens per image (concrete ids)."""
  if isinstance(input_ids, jax.core.Tracer):
    return
  n_tok = int(np.sum(np.asarray(input_ids) == config.image_token_id))
  n_feat = num_images * config.num_image_tokens
  if n_tok != n_feat:
    raise ValueError(
        f"input_ids hold {n_tok} image tokens (id {config.image_token_id}) but {num_images} image(s) give "
        f"{n_feat} features ({config.num_image_tokens} per image); the prompt and pixel_values do not match")


def merge_image_features(embeds: jax.Array, input_ids: jax.Array, feats: jax.Array, image_token_id: int):
  """Places feats [I, P, E] at the image-token positions of embeds [B, T, E], in row-major order."""
  is_img = input_ids == image_token_id
  flat = feats.reshape(-1, feats.shape[-1]).astype(embeds.dtype)
  order = jnp.cumsum(is_img.reshape(-1)).reshape(is_img.shape) - 1
  gathered = jnp.take(flat, jnp.clip(order, 0, flat.shape[0] - 1), axis=0)
  return jnp.where(is_img[..., None], gathered, embeds)


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
  """transformers' generate convention: cumsum(mask) - 1, padding set to 1."""
  pos = jnp.cumsum(attention_mask, axis=-1) - 1
  return jnp.where(attention_mask.astype(bool), pos, 1).astype(jnp.int32)


def prompt_context(input_ids, attention_mask, image_token_id: int, key_slots: int | None = None) -> AttnContext:
  """AttnContext for a prompt chunk of T tokens at slots [0, T) of S = key_slots (default T) key slots."""
  b, t = input_ids.shape
  s = t if key_slots is None else key_slots
  seg = segment_ids(input_ids, attention_mask, image_token_id)
  key_seg = jnp.full((b, s), -1, jnp.int32).at[:, :t].set(seg)
  valid = key_seg >= 0
  causal = jnp.arange(s)[None, :] <= jnp.arange(t)[:, None]
  mask = causal[None] & valid[:, None, :]
  return AttnContext(key_segments=key_seg, query_segments=seg, mask=mask, query_slot=jnp.arange(t), prefill=True)


def embed_inputs(params, config: LlavaConfig, input_ids, pixel_values):
  embeds = llama.embed_tokens(params["language_model"], input_ids)
  if pixel_values is not None:
    feats = image_features(params, config, pixel_values)
    embeds = merge_image_features(embeds, input_ids, feats, config.image_token_id)
  return embeds


def forward(
    params,
    config: LlavaConfig,
    input_ids: jax.Array,
    pixel_values: jax.Array | None,
    *,
    attention_mask: jax.Array | None = None,
    spec: RectificationSpec | None = None,
    output_attentions: bool = False,
    position_ids: jax.Array | None = None,
) -> dict:
  """Full (uncached) forward pass of any registered family (`models.family.forward`), named for LLaVA.

  Args:
    params: model params (a dict, or the object `air_jax.load_pretrained` returns).
    config: the static config (LlavaConfig, LlavaNextConfig, ... : it selects the family).
    input_ids: [B, T] int, image placeholders already expanded to the image's feature count.
    pixel_values: the family's vision input: LLaVA-1.5 [I, C, H, W] float, LLaVA-NeXT its dict (see
      models.llava_next); None for text only.
    attention_mask: [B, T], 1 for real tokens (left padding allowed). Default: all ones.
    spec: optional RectificationSpec (leaves [L, ...]); None compiles no intervention.
    output_attentions: also return `attentions` [L, B, H, T, T] (float32, after interventions).
    position_ids: [B, T]; default from the attention mask (transformers' generate convention).

  Returns:
    {"logits": [B, T, V] float32} plus "attentions" when asked.
  """
  return family_lib.forward(params, config, input_ids, pixel_values, attention_mask=attention_mask, spec=spec,
                            output_attentions=output_attentions, position_ids=position_ids)


# Checkpoint key layouts of LLaVA-1.5 (longest prefixes first: the first match wins).
#   legacy llava-hf : language_model.model.*, language_model.lm_head.*, vision_tower.vision_model.*, multi_modal_projector.*
#   transformers 4.5x: model.language_model.*, model.vision_tower.vision_model.*, model.multi_modal_projector.*, lm_head.*
#   transformers 5.x : language_model.model.*, language_model.lm_head.*, vision_tower.*, multi_modal_projector.*
KEY_PREFIXES = (
    ("model.vision_tower.vision_model.", "vision_tower."),
    ("vision_tower.vision_model.", "vision_tower."),
    ("model.vision_tower.", "vision_tower."),
    ("model.language_model.model.", "language_model."),
    ("model.language_model.", "language_model."),
    ("language_model.model.", "language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("multi_modal_projector.", "multi_modal_projector."),
    ("vision_tower.", "vision_tower."),
    ("lm_head.", "lm_head."),
)


class LlavaFamily(LlamaDecoderFamily):
  """LLaVA-1.5: CLIP tower -> 2-layer MLP projector -> Llama/Mistral decoder; one fixed-size image run."""

  name = "llava"
  model_types = ("llava",)
  architectures = ("LlavaForConditionalGeneration",)
  config_types = (LlavaConfig,)
  key_prefixes = KEY_PREFIXES

  def parse_config(self, raw):
    return llava_config_from_dict(raw)

  def param_shapes(self, config):
    from models.params import param_shapes

    return param_shapes(config)

  def prepare_inputs(self, processor, config, images, prompts, bucket):
    enc = chat.encode_left(processor, images, [chat.format_prompt(processor, p) for p in prompts])
    ids, mask = chat.bucket_left(enc["input_ids"], enc["attention_mask"], bucket,
                                 chat.pad_token_id(processor.tokenizer))
    return {"input_ids": ids, "attention_mask": mask, "vision": np.asarray(enc["pixel_values"], np.float32)}

  def embed(self, params, config, input_ids, attention_mask, vision):
    if vision is not None:
      check_image_tokens(config, input_ids, vision.shape[0])
    return embed_inputs(params, config, input_ids, vision)

  def partition_rules(self, config):
    # Megatron split over the "model" mesh axis (see air_jax.sharding); specs of the per-layer [out, in] tensors.
    col, row, col_b = ("model", None), (None, "model"), ("model",)
    return (
        (r"^language_model\.layers\.(self_attn\.(q|k|v)_proj|mlp\.(gate|up)_proj)\.weight$", col),
        (r"^language_model\.layers\.(self_attn\.(q|k|v)_proj|mlp\.(gate|up)_proj)\.bias$", col_b),
        (r"^language_model\.layers\.(self_attn\.o_proj|mlp\.down_proj)\.weight$", row),
        (r"^language_model\.embed_tokens\.weight$", col),
        (r"^lm_head\.weight$", col),
        (r"^vision_tower\.encoder\.layers\.(self_attn\.(q|k|v)_proj|mlp\.fc1)\.weight$", col),
        (r"^vision_tower\.encoder\.layers\.(self_attn\.(q|k|v)_proj|mlp\.fc1)\.bias$", col_b),
        (r"^vision_tower\.encoder\.layers\.(self_attn\.out_proj|mlp\.fc2)\.weight$", row),
        (r"^multi_modal_projector\.linear_1\.weight$", col),
        (r"^multi_modal_projector\.linear_1\.bias$", col_b),
        (r"^multi_modal_projector\.linear_2\.weight$", row),
    )


FAMILY = family_lib.register(LlavaFamily())


__all__ = ["forward", "image_features", "merge_image_features", "prompt_context", "positions_from_mask", "TEXT"]
