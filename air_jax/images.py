"""Images in, validated: paths, PIL images and arrays become RGB PIL images, or a clear error.

Arrays are checked before anything is captioned, because the wrong guesses produce captions that look fine:
  [H, W, 3] or [H, W] (grayscale); a batch goes in as a list, not a 4-D array;
  uint8 as is; other integer dtypes must lie in [0, 255];
  float arrays must be finite and non-negative (negative values mean an already normalised tensor, which the
  processor would normalise a second time). A float maximum above 1 means the 0-255 scale; a float image
  whose maximum is <= 1 is ambiguous (0-1 scale, or a dark 0-255 image?) and is refused: convert it to uint8.

Colour conversion follows transformers' image processors (`convert_to_rgb`), for paths and PIL images alike:
  images with an alpha channel (RGBA, LA, PA, or a palette / RGB image with a transparency key) are composited onto
  white before dropping the alpha, so transparent pixels become white instead of their hidden colour. (The
  official LLaVA / DeepSeek-VL2 loaders and transformers' `image_utils.load_image` for a path call a plain
  `Image.convert("RGB")`, which keeps the hidden colour; they differ from this only on transparent pixels.)
  Image files are turned upright by their EXIF orientation tag, as `image_utils.load_image` does (already opened
  PIL images are taken as given).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np


class ImageError(ValueError):
  """An image that cannot be used as given (the message names it and says what to do)."""


def _describe(arr: np.ndarray) -> str:
  desc = f"shape {tuple(arr.shape)}, dtype {arr.dtype}"
  if arr.size and arr.dtype != bool:
    with np.errstate(all="ignore"):
      desc += f", min {np.nanmin(arr) if not np.all(np.isnan(arr.astype(float))) else 'nan'}"
      desc += f", max {np.nanmax(arr) if not np.all(np.isnan(arr.astype(float))) else 'nan'}"
  return desc


def array_to_uint8(arr: Any, name: str = "image") -> np.ndarray:
  """Checks an image array and returns it as uint8 [H, W, 3] (or [H, W]); raises ImageError otherwise."""
  arr = np.asarray(arr)
  where = f"{name} ({_describe(arr)})"
  if arr.ndim == 4:
    raise ImageError(f"{where}: a 4-D array looks like a batch; pass a list of [H, W, 3] images instead")
  if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] != 3):
    raise ImageError(f"{where}: expected [H, W, 3] (RGB, channels last) or [H, W] (grayscale)")
  if arr.size == 0:
    raise ImageError(f"{where}: the image is empty")
  if arr.dtype == np.uint8:
    return arr
  if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
    raise ImageError(f"{where}: unsupported dtype; pass uint8 (0-255) or float values")
  if np.issubdtype(arr.dtype, np.integer):
    if arr.min() < 0 or arr.max() > 255:
      raise ImageError(f"{where}: integer pixel values must lie in [0, 255]")
    return arr.astype(np.uint8)
  arr = arr.astype(np.float64)
  if not np.all(np.isfinite(arr)):
    raise ImageError(f"{where}: holds NaN or infinite values")
  if arr.min() < 0:
    raise ImageError(f"{where}: negative values look like an already normalised tensor; pass the raw image "
                     "(uint8 0-255), the processor normalises it")
  if arr.max() > 255:
    raise ImageError(f"{where}: float values above 255; pass uint8 0-255")
  if arr.max() <= 1.0:
    raise ImageError(f"{where}: a float image with maximum <= 1 is ambiguous (0-1 scale or a dark 0-255 "
                     "image?); convert it first, e.g. (img * 255).round().astype(np.uint8) for a 0-1 image")
  return np.round(arr).astype(np.uint8)


def to_rgb(im):
  """A PIL image -> RGB PIL image, with any transparency composited onto white (transformers' `convert_to_rgb`)."""
  from PIL import Image

  if "A" in im.getbands() or im.info.get("transparency") is not None:
    im = im.convert("RGBA")
    white = Image.new("RGBA", im.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, im).convert("RGB")
  return im.convert("RGB")


def load_image(img: Any, name: str = "image"):
  """A path, PIL image or array -> RGB PIL image (see the module docstring for the array and colour rules)."""
  from PIL import Image, ImageOps

  if isinstance(img, (str, os.PathLike)):
    path = os.fspath(img)
    try:
      with Image.open(path) as im:
        # exif_transpose loads the pixels into a new image, so it outlives the file.
        return to_rgb(ImageOps.exif_transpose(im))
    except (OSError, ValueError) as e:
      raise ImageError(f"cannot read image {path!r}: {e}") from e
  if hasattr(img, "convert") and hasattr(img, "size"):
    return to_rgb(img)
  if isinstance(img, np.ndarray) or hasattr(img, "__array__"):
    return Image.fromarray(array_to_uint8(img, name)).convert("RGB")
  raise ImageError(f"{name} must be a PIL image, a numpy array or a path, not {type(img).__name__}")


def load_processor_image(img: Any, name: str = "image"):
  """An image in any single-image layout transformers' image processors take -> RGB PIL image.

  Arrays (numpy, or anything with `__array__` such as a CPU torch tensor) may be channels first or last with 1, 3
  or 4 channels; the layout is inferred as transformers does (channels first when both ends could be channels).
  Integer RGBA arrays are composited onto white as transformers' `convert_to_rgb` does. The value checks of
  `array_to_uint8` still apply (e.g. a float image with maximum <= 1 is refused as ambiguous).
  """
  if isinstance(img, (str, os.PathLike)) or (hasattr(img, "convert") and hasattr(img, "size")):
    return load_image(img, name)
  if not (isinstance(img, np.ndarray) or hasattr(img, "__array__")):
    raise ImageError(f"{name} must be a PIL image, a numpy array or a path, not {type(img).__name__}")
  arr = np.asarray(img)
  if arr.ndim == 3:
    # transformers' infer_channel_dimension_format(num_channels=(1, 3, 4)): the first axis wins a tie.
    if arr.shape[0] in (1, 3, 4):
      arr = np.moveaxis(arr, 0, -1)
    elif arr.shape[-1] not in (1, 3, 4):
      raise ImageError(f"{name} ({_describe(arr)}): cannot tell the channel axis; expected 1, 3 or 4 channels "
                       "first or last")
    if arr.shape[-1] == 1:
      arr = arr[..., 0]
    elif arr.shape[-1] == 4:
      if not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0 or arr.max() > 255:
        raise ImageError(f"{name} ({_describe(arr)}): an RGBA array must hold integers in [0, 255] (uint8)")
      alpha = arr[..., 3:4] / 255  # [H, W, 1]
      arr = np.round(alpha * arr[..., :3] + (1 - alpha) * 255).astype(arr.dtype)  # [H, W, 3] blended onto white
  return load_image(arr, name)
