"""DeepSeek-VL2 input processing as the official `DeepseekVLV2Processor` does it (deepseek-ai/DeepSeek-VL2), for
one prompt with images: dynamic tiling, normalisation and the `<image>` token runs. Pure PIL + numpy.

  * best resolution: among `candidate_resolutions` (w, h), the one that keeps the most of the image's pixels
    after an aspect-preserving downscale, ties broken by the least padding (official `select_best_resolution`);
    with more than two images the official processor does not crop (one local tile of S x S);
  * global view: the image padded (PIL `ImageOps.pad`, bicubic, centered) to S x S with the mean colour; local
    views: padded to the best resolution and cut row-major into S x S tiles; pixels -> [0, 1] -> (x - 0.5) / 0.5;
  * tokens: h (w + 1) + 1 + th h (tw w + 1) `<image>` ids per image (see models.deepseek_vl2), text splits
    tokenized without special tokens, one BOS in front, no EOS (inference).
Conversation ("deepseek" template of the official repo): "<|User|>: {prompt}\n\n<|Assistant|>:" with the image
placeholder at the start of the user turn, empty system prompt; the user content "<image>\n" + prompt is strip()-ed
as the official `format_messages_v2` does (`user_turn`).
"""

from __future__ import annotations

import numpy as np

from models.deepseek_vl2 import IMAGE_MEAN, IMAGE_STD, DeepseekVL2Config

USER_TEMPLATE = "<|User|>: <image>\n{prompt}\n\n<|Assistant|>:"
IMAGE_TOKEN = "<image>"


def user_turn(prompt: str) -> str:
  """The official conversation text for one image and `prompt`.

  Official `format_messages_v2` strips the whole user content after the image tag is put in front, so trailing
  whitespace of the prompt (and the tag's newline, for an empty prompt) is dropped; leading whitespace stays.
  """
  content = str(IMAGE_TOKEN + "\n" + prompt).strip()
  return f"<|User|>: {content}\n\n<|Assistant|>:"  # USER_TEMPLATE with its "<image>\n{prompt}" stripped


def select_best_resolution(image_size: tuple[int, int], candidates) -> tuple[int, int]:
  width, height = image_size
  best, best_eff, best_waste = None, 0, float("inf")
  for cw, ch in candidates:
    scale = min(cw / width, ch / height)
    eff = min(int(width * scale) * int(height * scale), width * height)
    waste = cw * ch - eff
    if eff > best_eff or (eff == best_eff and waste < best_waste):
      best, best_eff, best_waste = (cw, ch), eff, waste
  return best


def _to_array(img) -> np.ndarray:
  x = np.asarray(img.convert("RGB"), np.float32) / 255.0
  return ((x - IMAGE_MEAN) / IMAGE_STD).transpose(2, 0, 1)


def tile_image(image, cfg: DeepseekVL2Config, cropping: bool = True) -> tuple[np.ndarray, tuple[int, int]]:
  """-> (tiles [1 + tw*th, 3, S, S] float32, global view first; (num_width_tiles, num_height_tiles))."""
  from PIL import ImageOps

  s = cfg.vision.image_size
  bw, bh = select_best_resolution(image.size, cfg.candidate_resolutions) if cropping else (s, s)
  fill = (127, 127, 127)  # int(0.5 * 255) per channel, the official pad colour
  tiles = [_to_array(ImageOps.pad(image, (s, s), color=fill))]
  local = ImageOps.pad(image, (bw, bh), color=fill)
  for top in range(0, bh, s):
    for left in range(0, bw, s):
      tiles.append(_to_array(local.crop((left, top, left + s, top + s))))
  return np.stack(tiles), (bw // s, bh // s)


def encode(tokenizer, cfg: DeepseekVL2Config, text: str, images, cropping: bool | None = None):
  """text with one `<image>` per image -> (input_ids list, tiles [X, 3, S, S], spatial_crops [(tw, th)])."""
  parts = text.split(IMAGE_TOKEN)
  if len(parts) - 1 != len(images):
    raise ValueError(f"the prompt has {len(parts) - 1} '<image>' placeholders but {len(images)} images were given")
  cropping = len(images) <= 2 if cropping is None else cropping
  ids, tiles, crops = [], [], []
  for part, image in zip(parts, images):
    ids += tokenizer.encode(part, add_special_tokens=False)
    t, (tw, th) = tile_image(image, cfg, cropping)
    tiles.append(t)
    crops.append((tw, th))
    ids += [cfg.image_token_id] * cfg.num_image_tokens(tw, th)
  ids += tokenizer.encode(parts[-1], add_special_tokens=False)
  bos = cfg.text.bos_token_id
  ids = ([bos] if bos is not None else []) + ids
  s = cfg.vision.image_size
  return ids, (np.concatenate(tiles) if tiles else np.zeros((0, 3, s, s), np.float32)), crops


def batch(tokenizer, cfg: DeepseekVL2Config, texts, images_per_text, pad_id: int):
  """Left-padded batch: (input_ids [B, T], attention_mask [B, T], tiles [X, 3, S, S], spatial_crops)."""
  rows, all_tiles, all_crops = [], [], []
  for text, imgs in zip(texts, images_per_text):
    ids, t, c = encode(tokenizer, cfg, text, imgs)
    rows.append(ids)
    all_tiles.append(t)
    all_crops += c
  t = max(len(r) for r in rows)
  input_ids = np.full((len(rows), t), pad_id, np.int64)
  mask = np.zeros((len(rows), t), np.int64)
  for i, r in enumerate(rows):
    input_ids[i, t - len(r):] = r
    mask[i, t - len(r):] = 1
  return input_ids, mask, np.concatenate(all_tiles), all_crops
