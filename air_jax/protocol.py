"""Evaluation protocols: how prompts are built, padded and batched, and how AIR layer ranges are read.

`default` is this project's protocol: the checkpoint's own chat template (Hugging Face processor), prompt lengths
padded up to a multiple of 64 (fewer compilations), batches of 8, AIR layer ranges written for 32 layers and
scaled to the model's depth.

`official-air` reproduces the run behind the published AIR* numbers (AIR repository, `bash_scripts/decoding.sh`
-> `eval_scripts/eval_caption_air.py`, LLaVA-1.5):
  - prompt: LLaVA's own conversation template `vicuna_v1` (system prompt included: 35 tokens before the image in
    LLaVA-1.5) tokenised chunk by chunk as LLaVA's `tokenizer_image_token` does (see air_jax.conversation);
  - image: padded to a square with the image processor's mean colour before preprocessing (LLaVA-1.5's
    `image_aspect_ratio = "pad"`);
  - no prompt padding: bucket 0, and a batch whose prompts differ in length is run as groups of equal length
    (the official loader stacks prompts, which only works when they are equal);
  - batches of 4 in the sample's order (DataLoader, shuffle off): the AD-HH trigger of `official_compat` sums
    the text mass over exactly these 4 rows, as the official one does;
  - AIR layer ranges absolute ([5, 18) and [9, 15) for every depth, as the official scripts pass them; a model
    with fewer layers than a range's end is refused with an error naming the range, where the official code
    would silently edit only the layers it has), and
    `official_compat` on (the official formulas: whole-block QK energy, batch-summed AD-HH trigger, whole-matrix
    projection with its future leak);
  - float16 weights, as the official run (recorded; eval.chair loads the model in this dtype);
  - rows that have ended are fed LLaVA's pad id (0, the unknown token) while the batch goes on, as the official
    checkpoints' generation config does (those rows still count in the batch-summed AD-HH trigger).
Every results file of eval.chair records the protocol (`Protocol.to_dict`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from air_jax.conversation import get_template


@dataclasses.dataclass(frozen=True)
class Protocol:
  """How a run builds, pads and batches its prompts.

  Attributes:
    name: the protocol's name.
    conv_template: a LLaVA conversation template name (air_jax.conversation.CONV_TEMPLATES), or None for the
      checkpoint's chat template.
    bucket: prompt lengths are left padded up to a multiple of this (0: no padding beyond the batch's longest).
    group_by_length: run the prompts of a batch in groups of equal length (no padding at all).
    batch_size: images per generation call in eval.chair.
    absolute_layers: AIR layer ranges are absolute indices (AIRConfig.layer_ref = None) instead of scaled.
    official_compat: AIRConfig.official_compat for every AIR preset run under this protocol.
    pad_image_to_square: pad images to a square with the image processor's mean colour first.
    dtype: the model dtype the protocol runs in.
    finished_pad: the token fed to rows that have ended while others go on: None = the tokenizer's pad id;
      "unk" = the unknown token (id 0 in LLaVA-1.5's vocabulary), the pad id of the official LLaVA checkpoints'
      generation config (in official_compat those rows still count in the batch-summed AD-HH trigger).
    families: the model families (`models.family.Family.name`) the protocol reproduces a run of, or None for any:
      a protocol that re-creates one official script builds that script's inputs (LLaVA-1.5's prompt and pixels).
  """

  name: str
  conv_template: str | None = None
  bucket: int = 64
  group_by_length: bool = False
  batch_size: int = 8
  absolute_layers: bool = False
  official_compat: bool = False
  pad_image_to_square: bool = False
  dtype: str = "float32"
  finished_pad: str | None = None
  families: tuple[str, ...] | None = None

  def check_family(self, config) -> None:
    """Raises a clear error when the model's family is not one this protocol reproduces."""
    from models.family import family_of

    name = family_of(config).name
    if self.families is not None and name not in self.families:
      raise ValueError(f"protocol {self.name!r} re-creates the official run of the {' / '.join(self.families)} "
                       f"family and builds its inputs; this model is of the {name!r} family: use the default "
                       "protocol (no --protocol)")

  def __post_init__(self):
    if self.conv_template is not None:
      get_template(self.conv_template)  # a clear error for an unknown name
    if self.bucket < 0 or self.batch_size < 1:
      raise ValueError(f"protocol {self.name!r}: bucket must be >= 0 and batch_size >= 1, got {self.bucket}, "
                       f"{self.batch_size}")

  def air_overrides(self) -> dict[str, Any]:
    """AIRConfig fields this protocol fixes."""
    out: dict[str, Any] = {"layer_ref": None} if self.absolute_layers else {}
    if self.official_compat:
      out["official_compat"] = True
    return out

  def finished_pad_id(self, tokenizer) -> int | None:
    """The id fed to ended rows (None: the caller's default pad id)."""
    if self.finished_pad == "unk":
      return tokenizer.unk_token_id if tokenizer.unk_token_id is not None else 0
    return None

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


PROTOCOLS = {
    "default": Protocol("default"),
    "official-air": Protocol("official-air", conv_template="vicuna_v1", bucket=0, group_by_length=True,
                             batch_size=4, absolute_layers=True, official_compat=True, pad_image_to_square=True,
                             dtype="float16", finished_pad="unk", families=("llava",)),
}


def get_protocol(protocol: "str | Protocol | None") -> Protocol:
  """A Protocol from its name (None: "default"); an error lists the names."""
  if protocol is None:
    return PROTOCOLS["default"]
  if isinstance(protocol, Protocol):
    return protocol
  if protocol not in PROTOCOLS:
    raise ValueError(f"unknown protocol {protocol!r}; expected one of {sorted(PROTOCOLS)}")
  return PROTOCOLS[protocol]


def length_groups(lengths: Sequence[int]) -> list[list[int]]:
  """Indices grouped by equal length, groups in order of first appearance, indices in input order."""
  groups: dict[int, list[int]] = {}
  for i, n in enumerate(lengths):
    groups.setdefault(int(n), []).append(i)
  return list(groups.values())


def expand_to_square(image, background: Sequence[float]):
  """LLaVA's expand2square: pad a PIL image to a square, centred, with an RGB background colour (0-255 ints)."""
  from PIL import Image

  w, h = image.size
  if w == h:
    return image
  side = max(w, h)
  out = Image.new(image.mode, (side, side), tuple(int(c) for c in background))
  out.paste(image, ((side - w) // 2, (side - h) // 2))
  return out


def prepare_inputs(processor, images: Sequence, prompts: Sequence[str], protocol: Protocol, image_token_id: int,
                   pad_id: int, bucket: int, config=None):
  """(input_ids [B, T], attention_mask [B, T], pixel_values) of a batch built the protocol's way.

  Images are padded to squares first when the protocol asks; with a LLaVA conversation template the ids are
  LLaVA's (`air_jax.conversation.tokenize_with_image`), each image marker expanded to as many image tokens as
  the processor gives one image. Rows are left padded to the longest (then to a multiple of `bucket`).
  """
  import numpy as np

  from air_jax.conversation import get_template, tokenize_with_image

  if config is not None:
    protocol.check_family(config)
  images = list(images)
  if protocol.pad_image_to_square:
    mean = getattr(processor.image_processor, "image_mean", None) or (0.0, 0.0, 0.0)
    images = [expand_to_square(im, [int(c * 255) for c in mean]) for im in images]
  if protocol.conv_template is None:
    from air_jax.generate import prepare_inputs as hf_prepare

    return hf_prepare(processor, images, prompts, bucket, config=config)  # the family's inputs (config selects it)
  marker = getattr(processor, "image_token", None) or "<image>"
  enc = processor(images=images, text=[marker] * len(images), return_tensors="np")
  num_image_tokens = int(np.sum(enc["input_ids"][0] == image_token_id))
  if num_image_tokens < 1:
    raise ValueError(f"the processor gave no image token (id {image_token_id}) for one image; cannot expand "
                     "LLaVA's image marker")
  template = get_template(protocol.conv_template)
  rows = [tokenize_with_image(template.prompt(p), processor.tokenizer, image_token_id, num_image_tokens)
          for p in prompts]
  t = max(len(r) for r in rows)
  t = -(-t // bucket) * bucket if bucket > 0 else t
  ids = np.full((len(rows), t), pad_id, np.int32)
  mask = np.zeros((len(rows), t), np.int32)
  for i, r in enumerate(rows):
    ids[i, t - len(r):] = r
    mask[i, t - len(r):] = 1
  return ids, mask, enc["pixel_values"].astype(np.float32)
