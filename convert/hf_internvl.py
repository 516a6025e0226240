"""Loads a local Hugging Face InternVL (`-HF`) checkpoint directory: params (through the family's key table, see
models/internvl.py; Qwen3-MoE decoders through `load_moe_params`) and an images-only processor (tokenizer + image
processor + chat template, no video processor).
"""

from __future__ import annotations

import numpy as np

from convert.vl_processor import (ImageTextProcessor, load_tokenizer, read_chat_template, read_image_processor_config,
                                  read_json)
from models.internvl import FAMILY, InternVLConfig


def load_params(path: str, config: InternVLConfig, dtype=np.float32) -> dict:
  """Validated numpy params (every key used, every param filled) in the canonical tree."""
  return FAMILY.load_params(path, config, dtype)


def load_moe_params(path: str, config: InternVLConfig, dtype=np.float32) -> dict:
  """Validated numpy params of a Qwen3-MoE InternVL: the family's key table, then the experts of each sparse layer
  from either layout, per-expert keys `...mlp.experts.{j}.{gate,up,down}_proj.weight` (released checkpoints,
  transformers' save_pretrained) or transformers 5.x's fused `...mlp.experts.gate_up_proj` / `down_proj`
  (convert.tree_fill.set_fused_experts). Every key must be used and every param filled once."""
  from convert.checkpoint import checkpoint_files
  from convert.safetensors_io import SafetensorsFile
  from convert.tree_fill import TreeFiller, set_fused_experts

  filler = TreeFiller(FAMILY.param_shapes(config), dtype, path)
  for file in checkpoint_files(path):
    with SafetensorsFile(file) as st:
      for key in st.keys():
        if any(p.search(key) for p in FAMILY.ignored_keys):
          continue
        name = FAMILY.canonical_key(key)
        if name is None:
          filler.skip(key)
        elif not FAMILY.skip_key(name, config) and not set_fused_experts(filler, key, name, st.get(key)):
          filler.set(key, name, st.get(key))
  return filler.finish()


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
  """transformers' GotOcr2 image processor (PIL backend, no torchvision), as InternVL-HF checkpoints configure it
  (preprocessor_config.json or processor_config.json, see convert.vl_processor.read_image_processor_config)."""
  from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

  cfg = read_image_processor_config(path)
  keep = ("size", "crop_to_patches", "min_patches", "max_patches", "image_mean", "image_std", "do_resize",
          "do_rescale", "rescale_factor", "do_normalize", "do_convert_rgb", "resample")
  return GotOcr2ImageProcessorPil(**{k: v for k, v in cfg.items() if k in keep})


def load_processor(path: str, image_seq_length: int | None = None) -> InternVLProcessor:
  tok = load_tokenizer(path)
  seq = image_seq_length or read_json(path, "processor_config.json").get("image_seq_length", 256)
  return InternVLProcessor(tok, load_image_processor(path), read_chat_template(path, tok), int(seq))
