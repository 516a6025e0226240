"""Chat templates and tokenisation shared by the LLaVA-style families (processor in, left-padded numpy out)."""

from __future__ import annotations

import numpy as np

# LLaVA-1.5's conversation format, used when a checkpoint ships no chat template.
LLAVA_15_TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"
# The same format as a transformers chat template (jinja), for processors we build; the assistant turn ends with EOS.
LLAVA_15_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    " {% else %}ASSISTANT: {% for item in message['content'] %}{{ item['text'] }}{% endfor %}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def format_prompt(processor, prompt: str, fallback: str = LLAVA_15_TEMPLATE) -> str:
  """The checkpoint's chat template applied to one user turn (image first, then the text)."""
  if getattr(processor, "chat_template", None):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    import jinja2  # transformers renders chat templates with it

    try:
      return processor.apply_chat_template(msgs, add_generation_prompt=True)
    except jinja2.TemplateError as e:  # syntax or undefined names: the checkpoint's template file is at fault
      raise ValueError(f"the checkpoint's chat template (chat_template.jinja / chat_template.json / "
                       f"tokenizer_config.json) cannot be applied: {type(e).__name__}: {e}; fix or remove it "
                       "(without one the LLaVA-1.5 format is used)") from None
  return fallback.format(prompt=prompt)


def pad_token_id(tokenizer) -> int:
  """The id used for padding (0 when the tokenizer has none)."""
  return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def encode_left(processor, images, texts) -> dict:
  """processor(images, texts) with the tokenizer padding on the left, as numpy arrays."""
  tok = processor.tokenizer
  old_side = tok.padding_side
  tok.padding_side = "left"
  try:
    return dict(processor(images=list(images), text=list(texts), return_tensors="np", padding=True))
  finally:
    tok.padding_side = old_side


def bucket_left(ids: np.ndarray, mask: np.ndarray, bucket: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads ids/mask [B, T] up to a multiple of `bucket` (fewer compilations); bucket <= 0 keeps T."""
  ids, mask = ids.astype(np.int32), mask.astype(np.int32)
  t = ids.shape[1]
  target = -(-t // bucket) * bucket if bucket > 0 else t
  if target > t:
    ids = np.concatenate([np.full((ids.shape[0], target - t), pad_id, np.int32), ids], axis=1)
    mask = np.concatenate([np.zeros((mask.shape[0], target - t), np.int32), mask], axis=1)
  return ids, mask
