"""LLaVA-NeXT (transformers `LlavaNextForConditionalGeneration`): anyres tiles -> CLIP -> projector -> packing.

An image of size (h, w) is resized onto the best of `image_grid_pinpoints` (`select_best_resolution`), cut into
nph x npw tiles of the tower's image_size, plus one base tile of the whole image. Every tile goes through the
CLIP tower and the projector (P = (image_size / patch)^2 features each). Packing (transformers'
`pack_image_features`): the base tile's P features, then the tile features arranged as one
(nph * g) x (npw * g) grid (g = image_size / patch), cropped to the image's aspect ratio (`unpad_image`), each
grid row followed by the learned `image_newline` vector, read row-major.

Which feature goes to which image token depends only on the (concrete) image sizes, so it is computed on the
host as an index (`packing_rows`), and the traced model only gathers: per example a table
[M * P + 1, E] of its M tiles' features with the newline vector as the last row, and `image_rows` [N] naming
the table row of the example's n-th image token. This equals transformers' packing exactly, keeps shapes
static (M tiles per example, zero-padded tiles are computed and never read) and shards over the batch.

Vision input (`Family.prepare_inputs` "vision"), every array batch-leading:
  pixel_values [B, M, C, S, S] float32   the tiles of the example's images, in order, zero-padded to M
  image_rows   [B, N] int32              table row of each image token of the example (N = max count, 0-padded)
  image_tokens [B] int32                 how many image tokens the example must hold (checked on concrete ids)
Params: LLaVA-1.5's tree plus "image_newline" [E].
Legend: B batch, T tokens, M tiles per example, P features per tile, E text width, g grid side of one tile.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from models import chat
from models import family as family_lib
from models import llava
from models.config import LlavaConfig, _check, llava_config_from_dict

DEFAULT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


@dataclasses.dataclass(frozen=True)
class LlavaNextConfig(LlavaConfig):
  """LLaVA-1.5's fields plus the anyres grid pinpoints ((height, width), ...)."""

  image_grid_pinpoints: tuple[tuple[int, int], ...] = DEFAULT_PINPOINTS


def llava_next_config_from_dict(d: dict) -> LlavaNextConfig:
  """Parses a transformers LLaVA-NeXT `config.json` dict (Llama or Mistral decoder)."""
  model_type = d.get("model_type", "llava_next")
  _check(model_type == "llava_next", "model_type", model_type, "'llava_next'")
  strategy = d.get("vision_feature_select_strategy", "default")
  # "full" keeps CLS in every tile, which cannot be laid out on the tile grid (transformers fails there too).
  _check(strategy == "default", "vision_feature_select_strategy", strategy, "'default' for LLaVA-NeXT")
  base = llava_config_from_dict(dict(d, model_type="llava"))
  pins = d.get("image_grid_pinpoints") or DEFAULT_PINPOINTS
  try:
    pins = tuple((int(h), int(w)) for h, w in pins)
  except (TypeError, ValueError):
    raise ValueError(f"config field 'image_grid_pinpoints' has unsupported value {pins!r}; expected a list of "
                     "[height, width] pairs") from None
  size = base.vision.image_size
  for h, w in pins:
    _check(h > 0 and w > 0 and h % size == 0 and w % size == 0, "image_grid_pinpoints", [h, w],
           f"positive multiples of vision_config.image_size={size}")
  fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(LlavaConfig)}
  return LlavaNextConfig(**fields, image_grid_pinpoints=pins)


# ----------------------------------------------------------------------------------------------------------------
# Host-side packing index (numpy, concrete image sizes)
# ----------------------------------------------------------------------------------------------------------------


def select_best_resolution(size: tuple[int, int], pinpoints) -> tuple[int, int]:
  """The pinpoint (height, width) that keeps most of the image's resolution, then wastes least (transformers')."""
  h0, w0 = size
  best, best_eff, best_waste = None, 0, float("inf")
  for h, w in pinpoints:
    scale = min(w / w0, h / h0)
    eff = min(int(w0 * scale) * int(h0 * scale), w0 * h0)
    waste = w * h - eff
    if eff > best_eff or (eff == best_eff and waste < best_waste):
      best, best_eff, best_waste = (h, w), eff, waste
  return best


def num_tiles(config: LlavaNextConfig, size: tuple[int, int]) -> int:
  """Tiles of an image of size (height, width): the grid plus the base tile."""
  h, w = select_best_resolution(size, config.image_grid_pinpoints)
  s = config.vision.image_size
  return (h // s) * (w // s) + 1


def packing_rows(config: LlavaNextConfig, size: tuple[int, int]) -> np.ndarray:
  """Rows, into the image's own feature table [tiles * P] with -1 for image_newline, of its packed features."""
  s, p = config.vision.image_size, config.vision.patch_size
  g = s // p
  n_patch = g * g
  bh, bw = select_best_resolution(size, config.image_grid_pinpoints)
  nph, npw = bh // s, bw // s
  cur_h, cur_w = nph * g, npw * g
  h0, w0 = int(size[0]), int(size[1])
  rows_keep, cols_keep = range(cur_h), range(cur_w)
  if w0 / h0 > cur_w / cur_h:  # unpad_image: crop rows (python floats, as transformers)
    new_h = int(round(h0 * (cur_w / w0), 7))
    pad = (cur_h - new_h) // 2
    rows_keep = range(pad, cur_h - pad)
  else:
    new_w = int(round(w0 * (cur_h / h0), 7))
    pad = (cur_w - new_w) // 2
    cols_keep = range(pad, cur_w - pad)
  out = list(range(n_patch))  # the base tile
  for y in rows_keep:
    for x in cols_keep:
      tile = 1 + (y // g) * npw + (x // g)
      out.append(tile * n_patch + (y % g) * g + (x % g))
    out.append(-1)
  return np.asarray(out, np.int64)


def num_image_tokens(config: LlavaNextConfig, size: tuple[int, int]) -> int:
  """Image tokens (= packed features) of one image of size (height, width)."""
  return len(packing_rows(config, size))


def vision_inputs(config: LlavaNextConfig, pixel_values, image_sizes, images_per_example) -> dict:
  """The model's vision dict from processor outputs.

  Args:
    config: the LlavaNextConfig.
    pixel_values: [I, M0, C, S, S] (processor output: tiles of each image, zero-padded to M0) in image order.
    image_sizes: [I, 2] original (height, width) of each image.
    images_per_example: [B] how many images each example's prompt holds (in order).
  """
  pixel_values = np.asarray(pixel_values, np.float32)
  sizes = np.asarray(image_sizes).reshape(-1, 2)
  counts = [int(c) for c in images_per_example]
  if sum(counts) != len(sizes) or len(pixel_values) != len(sizes):
    raise ValueError(f"{len(sizes)} image sizes / {len(pixel_values)} pixel tensors for {sum(counts)} image "
                     "placeholders in the prompts")
  n_patch = (config.vision.image_size // config.vision.patch_size) ** 2
  tiles = [num_tiles(config, tuple(s)) for s in sizes]
  for i, (t, s) in enumerate(zip(tiles, sizes)):
    if t > pixel_values.shape[1]:
      raise ValueError(f"image {i} of size {tuple(int(v) for v in s)} needs {t} tiles under the model's "
                       f"image_grid_pinpoints but pixel_values holds {pixel_values.shape[1]}: the processor's "
                       "image_grid_pinpoints differ from the model config's")
  per_ex_tiles = []
  start = 0
  for c in counts:
    per_ex_tiles.append(sum(tiles[start:start + c]))
    start += c
  m = max(max(per_ex_tiles), 1)
  rows_all, pix = [], np.zeros((len(counts), m) + pixel_values.shape[2:], np.float32)
  start = 0
  for b, c in enumerate(counts):
    rows, off = [], 0
    for i in range(start, start + c):
      pix[b, off:off + tiles[i]] = pixel_values[i, :tiles[i]]
      r = packing_rows(config, tuple(sizes[i]))
      rows.append(np.where(r < 0, -1, r + off * n_patch))
      off += tiles[i]
    start += c
    rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    rows_all.append(np.where(rows < 0, m * n_patch, rows))  # the newline is the table's last row
  n = max(max(len(r) for r in rows_all), 1)
  image_rows = np.zeros((len(counts), n), np.int32)
  for b, r in enumerate(rows_all):
    image_rows[b, :len(r)] = r
  return {"pixel_values": pix, "image_rows": image_rows,
          "image_tokens": np.asarray([len(r) for r in rows_all], np.int32)}


# ----------------------------------------------------------------------------------------------------------------
# Traced model pieces
# ----------------------------------------------------------------------------------------------------------------


def feature_table(params, config: LlavaNextConfig, pixel_values: jax.Array) -> jax.Array:
  """pixel_values [B, M, C, S, S] -> per-example table [B, M * P + 1, E] (the last row is image_newline)."""
  b, m = pixel_values.shape[:2]
  feats = llava.image_features(params, config, pixel_values.reshape((b * m,) + pixel_values.shape[2:]))
  feats = feats.reshape(b, -1, feats.shape[-1])
  newline = jnp.broadcast_to(params["image_newline"].astype(feats.dtype), (b, 1, feats.shape[-1]))
  return jnp.concatenate([feats, newline], axis=1)


def check_image_tokens(config: LlavaNextConfig, input_ids, vision: dict) -> None:
  """Raises if an example's image-token count differs from its packed feature count (concrete inputs only)."""
  want = vision.get("image_tokens")
  if want is None or isinstance(input_ids, jax.core.Tracer) or isinstance(want, jax.core.Tracer):
    return
  got = np.sum(np.asarray(input_ids) == config.image_token_id, axis=-1)
  want = np.asarray(want)
  bad = np.nonzero(got != want)[0]
  if bad.size:
    i = int(bad[0])
    raise ValueError(f"example {i} holds {int(got[i])} image tokens (id {config.image_token_id}) but its images "
                     f"pack into {int(want[i])} features under the model's image_grid_pinpoints; the prompt, "
                     "image sizes and pixel_values do not match")


def embed(params, config: LlavaNextConfig, input_ids, vision: dict | None) -> jax.Array:
  """Token embeddings with each example's packed image features at its image tokens, in order."""
  embeds = llava.llama.embed_tokens(params["language_model"], input_ids)
  if vision is None:
    return embeds
  check_image_tokens(config, input_ids, vision)
  table = feature_table(params, config, jnp.asarray(vision["pixel_values"]))  # [B, R, E]
  rows = jnp.asarray(vision["image_rows"])  # [B, N]
  is_img = input_ids == config.image_token_id
  order = jnp.clip(jnp.cumsum(is_img, axis=-1) - 1, 0, rows.shape[1] - 1)  # n-th image token of the row
  row = jnp.take_along_axis(rows, order, axis=1)  # [B, T]
  gathered = jnp.take_along_axis(table, row[..., None], axis=1).astype(embeds.dtype)
  return jnp.where(is_img[..., None], gathered, embeds)


KEY_PREFIXES = (
    ("model.image_newline", "image_newline"),
    ("image_newline", "image_newline"),
) + llava.KEY_PREFIXES


class LlavaNextFamily(llava.LlavaFamily):
  """LLaVA-NeXT (v1.6): anyres tiles, unpadding, image_newline; Vicuna/Yi (Llama) or Mistral decoders."""

  name = "llava_next"
  model_types = ("llava_next",)
  architectures = ("LlavaNextForConditionalGeneration",)
  config_types = (LlavaNextConfig,)
  key_prefixes = KEY_PREFIXES

  def parse_config(self, raw):
    return llava_next_config_from_dict(raw)

  def param_shapes(self, config):
    from models.params import param_shapes

    return dict(param_shapes(config), image_newline=(config.text.hidden_size,))

  def prepare_inputs(self, processor, config, images, prompts, bucket):
    texts = [chat.format_prompt(processor, p) for p in prompts]
    enc = chat.encode_left(processor, images, texts)
    ids, mask = chat.bucket_left(enc["input_ids"], enc["attention_mask"], bucket,
                                 chat.pad_token_id(processor.tokenizer))
    token = getattr(processor, "image_token", "<image>")
    per_example = [t.count(token) for t in texts]
    vision = vision_inputs(config, enc["pixel_values"], enc["image_sizes"], per_example)
    return {"input_ids": ids, "attention_mask": mask, "vision": vision}

  def embed(self, params, config, input_ids, attention_mask, vision):
    return embed(params, config, input_ids, vision)

  def max_image_tokens(self, config):
    return max(num_image_tokens(config, (h, w)) for h, w in config.image_grid_pinpoints)

  def max_vision_tiles(self, config):
    return max(num_tiles(config, (h, w)) for h, w in config.image_grid_pinpoints)


FAMILY = family_lib.register(LlavaNextFamily())

__all__ = ["FAMILY", "LlavaNextConfig", "embed", "feature_table", "llava_next_config_from_dict", "num_image_tokens",
           "num_tiles", "packing_rows", "select_best_resolution", "vision_inputs"]
