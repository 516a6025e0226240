"""Inputs shared by the Qwen2.5-VL and InternVL families: chat turns with several images, per-row feature merge."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from models import chat


def merge_rows(embeds: jax.Array, input_ids: jax.Array, feats: jax.Array, image_token_id: int) -> jax.Array:
  """Row b's k-th image token takes feats[b, k]: embeds [B, T, E], feats [B, M, E] (M >= image tokens per row)."""
  is_img = input_ids == image_token_id
  order = jnp.clip(jnp.cumsum(is_img, axis=1) - 1, 0, feats.shape[1] - 1)
  gathered = jnp.take_along_axis(feats.astype(embeds.dtype), order[..., None], axis=1)
  return jnp.where(is_img[..., None], gathered, embeds)


def chat_turn(processor, prompt: str, num_images: int = 1) -> str:
  """One user turn (num_images images, then the text) through the checkpoint's chat template."""
  content = [{"type": "image"}] * num_images + [{"type": "text", "text": prompt}]
  return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def image_groups(images) -> list[list]:
  """Per example: a list of images (an example may be one image or a list/tuple of several)."""
  return [list(x) if isinstance(x, (list, tuple)) else [x] for x in images]


def encode_turns(processor, images, prompts, bucket: int) -> tuple[dict, np.ndarray, np.ndarray, list[list]]:
  """Processor encoding of one chat turn per example (its images, then its prompt), left padded and bucketed.

  Returns (the processor's outputs, input_ids [B, T] int32, attention_mask [B, T] int32, the image groups).
  """
  groups = image_groups(images)
  enc = chat.encode_left(processor, [im for g in groups for im in g],
                         [chat_turn(processor, p, len(g)) for p, g in zip(prompts, groups)])
  ids, mask = chat.bucket_left(enc["input_ids"], enc["attention_mask"], bucket, chat.pad_token_id(processor.tokenizer))
  return enc, ids, mask, groups
