"""Image + text processors built from a checkpoint directory without transformers' video processor.

transformers' Qwen2.5-VL and InternVL processors require a video processor, which requires torchvision; on CPU
installs without a working torchvision `AutoProcessor.from_pretrained` fails for both. These processors load only
the tokenizer, the image processor (transformers' PIL backend) and the chat template, and expand image
placeholders exactly as the transformers processors do. Videos raise a clear error.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np

_VIDEO_ERROR = ("video inputs are not supported yet (this processor loads images only, without transformers' video "
                "processor, which needs torchvision)")


def _is_pil(img) -> bool:
  from PIL import Image

  return isinstance(img, Image.Image)


def read_json(path: str, name: str) -> dict:
  file = os.path.join(path, name)
  if not os.path.exists(file):
    return {}
  with open(file) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{file} is not valid JSON: {e}") from e


def read_image_processor_config(path: str) -> dict:
  """The image processor's settings: preprocessor_config.json (transformers 4 layout) when present, else the
  "image_processor" dict of processor_config.json (transformers 5 `ProcessorMixin.save_pretrained` writes one file
  with each sub-processor's settings nested under its name)."""
  if os.path.exists(os.path.join(path, "preprocessor_config.json")):
    return read_json(path, "preprocessor_config.json")
  nested = read_json(path, "processor_config.json").get("image_processor")
  if isinstance(nested, dict):
    return nested
  raise FileNotFoundError(f"no image processor settings in {path}: expected preprocessor_config.json, or "
                          "processor_config.json with an \"image_processor\" entry")


def read_chat_template(path: str, tokenizer) -> str | None:
  """chat_template.jinja, chat_template.json, processor_config.json or the tokenizer's template (in that order)."""
  jinja = os.path.join(path, "chat_template.jinja")
  if os.path.exists(jinja):
    with open(jinja) as f:
      return f.read()
  for name in ("chat_template.json", "processor_config.json"):
    template = read_json(path, name).get("chat_template")
    if template:
      return template
  return getattr(tokenizer, "chat_template", None)


def load_tokenizer(path: str):
  from transformers import AutoTokenizer  # deferred: slow import

  try:
    return AutoTokenizer.from_pretrained(path)
  except Exception as e:  # transformers raises many types here; name the directory
    raise ValueError(f"could not load the tokenizer from {path}: {e}") from e


class ImageTextProcessor:
  """The common part: tokenizer, image processor, chat template; subclasses expand the image placeholders.

  Called like a transformers processor: `proc(images=[...], text=[...], return_tensors="np", padding=True)`.
  Images may be PIL images, paths or arrays in transformers' layouts (air_jax.images.load_processor_image); arrays
  go through air-jax's value checks, so a non-integral float image is rounded to uint8 first (transformers would
  rescale the float values as they are).
  """

  image_token: str = "<image>"
  # Side the processor pads on when the tokenizer's saved config does not name one (None: the tokenizer's own).
  default_padding_side: str | None = None

  def __init__(self, tokenizer, image_processor, chat_template: str | None = None):
    self.tokenizer = tokenizer
    self.image_processor = image_processor
    self.chat_template = chat_template

  @property
  def image_token_id(self) -> int:
    return self.tokenizer.convert_tokens_to_ids(self.image_token)

  def apply_chat_template(self, messages, add_generation_prompt: bool = True, **kwargs) -> str:
    if not self.chat_template:
      raise ValueError("this checkpoint ships no chat template (chat_template.jinja / chat_template.json)")
    return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                              add_generation_prompt=add_generation_prompt, **kwargs)

  def batch_decode(self, ids, **kwargs):
    return self.tokenizer.batch_decode(ids, **kwargs)

  def decode(self, ids, **kwargs):
    return self.tokenizer.decode(ids, **kwargs)

  def process_images(self, images) -> tuple[dict, list[str]]:
    """Image processor outputs (numpy) and one replacement string per image."""
    raise NotImplementedError

  def extra_outputs(self, input_ids: np.ndarray) -> dict:
    """Outputs derived from the final ids (e.g. Qwen's mm_token_type_ids)."""
    return {}

  def __call__(self, images=None, text=None, videos=None, return_tensors="np", padding=True, **kwargs):
    if videos is not None:
      raise ValueError(_VIDEO_ERROR)
    if text is None:
      raise ValueError("text is required")
    text = [text] if isinstance(text, str) else list(text)
    images = [] if images is None else (list(images) if isinstance(images, (list, tuple)) else [images])
    n_in_text = sum(t.count(self.image_token) for t in text)
    if n_in_text != len(images):
      raise ValueError(f"the prompts hold {n_in_text} {self.image_token} placeholders but {len(images)} images were "
                       "given; use one placeholder (one image entry of the chat template) per image")
    data = {}
    if images:
      from air_jax.images import load_processor_image  # deferred: importing air_jax loads jax

      # Arrays (HWC or CHW, as transformers' processors take them) and paths become RGB PIL images here, so
      # process_images sees PIL only; PIL images go to the image processor as given.
      images = [im if _is_pil(im) else load_processor_image(im, f"image {i}") for i, im in enumerate(images)]
      data, replacements = self.process_images(images)
      it = iter(replacements)
      # re.sub scans each prompt once, so the inserted runs are not matched again.
      text = [re.sub(re.escape(self.image_token), lambda _: next(it), t) for t in text]
    tok = self.tokenizer
    old = tok.padding_side
    if self.default_padding_side and "padding_side" not in getattr(tok, "init_kwargs", {}):
      tok.padding_side = self.default_padding_side
    try:
      enc = tok(text, padding=padding, return_tensors="np", **kwargs)
    finally:
      tok.padding_side = old
    out = {"input_ids": np.asarray(enc["input_ids"]), "attention_mask": np.asarray(enc["attention_mask"])}
    out.update(data)
    out.update(self.extra_outputs(out["input_ids"]))
    if return_tensors == "pt":
      import torch

      out = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()}
    return out
