"""Loads a local Hugging Face InternVL (`-HF`) checkpoint directory into air-jax params, and its processor.

Key layouts accepted (one canonical tree, see models/internvl.py):
  transformers >= 4.52 and 5.x: model.vision_tower.*, model.multi_modal_projector.*, model.language_model.*, lm_head.*
  transformers 4.5x (pre-refactor): vision_tower.*, multi_modal_projector.*, language_model.model.*,
                                    language_model.lm_head.*
(The original OpenGVLab remote-code checkpoints, without `-HF`, use another layout and fused qkv; convert them with
OpenGVLab's script first.)
"""

from __future__ import annotations

import dataclasses

import numpy as np

from convert.hf_generic import load_with_table, stored_head_differs
from convert.vl_processor import ImageTextProcessor, load_tokenizer, read_chat_template, read_json
from models.internvl import InternVLConfig, load_config, param_shapes

PREFIXES = (
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", "language_model."),
    ("language_model.model.", "language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.", "vision_tower."),
    ("multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "lm_head."),
)


def load_params(path: str, config: InternVLConfig, dtype=np.float32) -> dict:
  return load_with_table(path, param_shapes(config), PREFIXES, tied=config.text.tie_word_embeddings, dtype=dtype)


def resolve_tying(path: str, config: InternVLConfig) -> InternVLConfig:
  """The config with an untied head when it asks for tying but the checkpoint stores a different lm_head
  (InternVL-HF conversions leave `tie_word_embeddings` unset, whose transformers default is True)."""
  if config.text.tie_word_embeddings and stored_head_differs(path, PREFIXES):
    return dataclasses.replace(config, text=dataclasses.replace(config.text, tie_word_embeddings=False))
  return config


def load(path: str, dtype=np.float32) -> tuple[InternVLConfig, dict]:
  """(config, params) of a checkpoint directory, the head tied or not as transformers would load it."""
  config = resolve_tying(path, load_config(path))
  return config, load_params(path, config, dtype)


class InternVLProcessor(ImageTextProcessor):
  """transformers' InternVLProcessor for images: dynamic tiling with a thumbnail (the image processor's
  crop_to_patches), `<IMG_CONTEXT>` -> `<img>` + image_seq_length * tiles context tokens + `</img>`, tiles of the
  whole batch concatenated in prompt order, left padding unless the tokenizer's saved config names a side (the
  transformers processor's kwargs precedence)."""

  default_padding_side = "left"

  def __init__(self, tokenizer, image_processor, chat_template=None, image_seq_length: int = 256):
    super().__init__(tokenizer, image_processor, chat_template)
    self.image_seq_length = image_seq_length
    self.start_image_token = getattr(tokenizer, "start_image_token", None) or "<img>"
    self.end_image_token = getattr(tokenizer, "end_image_token", None) or "</img>"
    self.image_token = getattr(tokenizer, "context_image_token", None) or "<IMG_CONTEXT>"
    unk = tokenizer.unk_token_id
    for t in (self.start_image_token, self.end_image_token, self.image_token):
      tid = tokenizer.convert_tokens_to_ids(t)
      if tid is None or (tid == unk and t != tokenizer.unk_token):
        raise ValueError(f"the tokenizer has no special token {t!r}; InternVL needs <img>, </img> and <IMG_CONTEXT> "
                         "(tokenizer_config.json extra_special_tokens)")

  def process_images(self, images):
    out = self.image_processor(images, crop_to_patches=True, return_tensors="np")
    tiles = [int(n) for n in np.asarray(out["num_patches"]).reshape(-1)]
    runs = [self.start_image_token + self.image_token * (self.image_seq_length * n) + self.end_image_token
            for n in tiles]
    return {"pixel_values": np.asarray(out["pixel_values"], np.float32), "num_patches": np.asarray(tiles)}, runs


def load_image_processor(path: str):
  """transformers' GotOcr2 image processor (PIL backend, no torchvision), as InternVL-HF checkpoints configure it."""
  from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

  cfg = read_json(path, "preprocessor_config.json")
  if not cfg:
    raise FileNotFoundError(f"no preprocessor_config.json in {path}")
  keep = ("size", "crop_to_patches", "min_patches", "max_patches", "image_mean", "image_std", "do_resize",
          "do_rescale", "rescale_factor", "do_normalize", "do_convert_rgb", "resample")
  return GotOcr2ImageProcessorPil(**{k: v for k, v in cfg.items() if k in keep})


def load_processor(path: str, image_seq_length: int | None = None) -> InternVLProcessor:
  tok = load_tokenizer(path)
  seq = image_seq_length or read_json(path, "processor_config.json").get("image_seq_length", 256)
  return InternVLProcessor(tok, load_image_processor(path), read_chat_template(path, tok), int(seq))
