"""Loads a local Hugging Face Qwen2.5-VL checkpoint directory: params (through the family's key table, see
models/qwen2_5_vl.py) and an images-only processor (tokenizer + image processor + chat template, no video
processor)."""

from __future__ import annotations

import numpy as np

from convert.vl_processor import ImageTextProcessor, load_tokenizer, read_chat_template, read_image_processor_config
from models.qwen2_5_vl import FAMILY, Qwen25VLConfig


def load_params(path: str, config: Qwen25VLConfig, dtype=np.float32) -> dict:
  """Validated numpy params (every key used, every param filled) in the canonical tree."""
  from convert.checkpoint import load_params as load

  return load(path, config, dtype, family=FAMILY)


class Qwen25VLProcessor(ImageTextProcessor):
  """transformers' Qwen2_5_VLProcessor for images: `<|image_pad|>` -> t*h*w/merge^2 copies; outputs
  pixel_values [N, C*Tp*p*p] (flat patches), image_grid_thw [I, 3] and mm_token_type_ids (1 at image tokens)."""

  image_token = "<|image_pad|>"

  def process_images(self, images):
    ip = self.image_processor
    for img in images:
      w, h = img.size
      if min(h, w) < 1 or max(h, w) / min(h, w) > 200:
        raise ValueError(f"image of size {w}x{h} cannot be processed: Qwen2.5-VL needs an aspect ratio below 200")
    out = ip(images, return_tensors="np")
    grid = np.asarray(out["image_grid_thw"])
    if (grid[:, 1:] < ip.merge_size).any():
      raise ValueError(f"an image was resized to fewer than {ip.patch_size * ip.merge_size} pixels per side (grid "
                       f"{grid.tolist()}); raise min_pixels in preprocessor_config.json")
    unit = ip.merge_size**2
    return ({"pixel_values": np.asarray(out["pixel_values"], np.float32), "image_grid_thw": grid},
            [self.image_token * int(g.prod() // unit) for g in grid])

  def extra_outputs(self, input_ids):
    return {"mm_token_type_ids": (input_ids == self.image_token_id).astype(np.int64)}


def load_image_processor(path: str):
  """transformers' Qwen2-VL image processor (PIL backend, no torchvision) from preprocessor_config.json or
  processor_config.json (convert.vl_processor.read_image_processor_config)."""
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

  cfg = read_image_processor_config(path)
  keep = ("min_pixels", "max_pixels", "size", "patch_size", "temporal_patch_size", "merge_size", "image_mean",
          "image_std", "do_resize", "do_rescale", "rescale_factor", "do_normalize", "do_convert_rgb", "resample")
  return Qwen2VLImageProcessorPil(**{k: v for k, v in cfg.items() if k in keep})


def load_processor(path: str) -> Qwen25VLProcessor:
  tok = load_tokenizer(path)
  return Qwen25VLProcessor(tok, load_image_processor(path), read_chat_template(path, tok))
