"""air_jax.images against transformers' image loading: transparency onto white, EXIF orientation, array layouts."""

import numpy as np
import pytest
from PIL import Image

from air_jax.images import ImageError, load_image, load_processor_image


def _hf_rgb(im) -> np.ndarray:
  from transformers.image_transforms import convert_to_rgb

  return convert_to_rgb(im, return_numpy=True)


def _rgba(h=5, w=7, alpha=None, seed=0):
  rng = np.random.default_rng(seed)
  a = rng.integers(0, 256, (h, w, 1), dtype=np.uint8) if alpha is None else np.full((h, w, 1), alpha, np.uint8)
  return np.concatenate([rng.integers(0, 256, (h, w, 3), dtype=np.uint8), a], -1)  # [H, W, 4]


def _transparent_images():
  rgba = _rgba()
  p = Image.fromarray(rgba[..., :3]).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
  p.info["transparency"] = 0  # palette index 0 is transparent
  rgb_key = Image.fromarray(rgba[..., :3])
  rgb_key.info["transparency"] = tuple(int(v) for v in rgba[0, 0, :3])  # one colour keyed out
  return {"RGBA": Image.fromarray(rgba, "RGBA"), "LA": Image.fromarray(rgba[..., [0, 3]], "LA"), "P": p,
          "PA": Image.fromarray(rgba, "RGBA").convert("PA"), "RGB+key": rgb_key}


def test_fully_transparent_pixels_become_white():
  im = Image.fromarray(_rgba(alpha=0), "RGBA")
  out = np.asarray(load_image(im))
  assert out.shape == (5, 7, 3) and (out == 255).all()


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "PA", "RGB+key"])
def test_transparency_is_composited_like_transformers(mode):
  im = _transparent_images()[mode]
  out = load_image(im)
  assert out.mode == "RGB"
  np.testing.assert_array_equal(np.asarray(out), _hf_rgb(im))


def test_transparent_png_path_is_composited(tmp_path):
  path = tmp_path / "a.png"
  rgba = _rgba(seed=1)
  rgba[0, 0, 3] = 0  # one fully transparent pixel
  im = Image.fromarray(rgba, "RGBA")
  im.save(path)
  np.testing.assert_array_equal(np.asarray(load_image(str(path))), _hf_rgb(im))
  assert (np.asarray(load_image(path))[0, 0] == 255).all()


def test_exif_orientation_is_applied_to_paths(tmp_path):
  from transformers.image_utils import load_image as hf_load_image

  path = tmp_path / "rot.jpg"
  exif = Image.Exif()
  exif[0x0112] = 6  # orientation 6: the stored pixels must be rotated 90 degrees clockwise for display
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(
      path, exif=exif.tobytes(), quality=95)
  ours = load_image(str(path))
  assert ours.size == (40, 56)  # stored 56 wide x 40 high, shown 40 wide x 56 high
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(hf_load_image(str(path))))
  # An already opened image is taken as given, as transformers' processors take it.
  with Image.open(path) as im:
    assert load_image(im).size == (56, 40)


@pytest.mark.parametrize("layout", ["HWC", "CHW", "HW1", "1HW", "HW"])
def test_processor_array_layouts(layout):
  rgb = np.random.default_rng(2).integers(0, 256, (6, 9, 3), dtype=np.uint8)  # [H, W, 3]
  gray = rgb[..., 0]  # [H, W]
  arr, want = {"HWC": (rgb, rgb), "CHW": (rgb.transpose(2, 0, 1), rgb), "HW1": (gray[..., None], gray),
               "1HW": (gray[None], gray), "HW": (gray, gray)}[layout]
  out = np.asarray(load_processor_image(arr))
  np.testing.assert_array_equal(out, want if want.ndim == 3 else np.repeat(want[..., None], 3, -1))


@pytest.mark.parametrize("channels_first", [False, True])
def test_processor_rgba_arrays_composite_like_transformers(channels_first):
  rgba = _rgba(seed=3)
  arr = rgba.transpose(2, 0, 1) if channels_first else rgba
  np.testing.assert_array_equal(np.asarray(load_processor_image(arr)), _hf_rgb(rgba))


def test_processor_arrays_keep_the_value_checks():
  with pytest.raises(ImageError, match="ambiguous"):
    load_processor_image(np.full((3, 8, 8), 0.5, np.float32))
  with pytest.raises(ImageError, match="channel axis"):
    load_processor_image(np.zeros((8, 8, 5), np.uint8))
  with pytest.raises(ImageError, match="RGBA"):
    load_processor_image(np.zeros((8, 8, 4), np.float32))
