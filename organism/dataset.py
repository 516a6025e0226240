"""Dataset writer (COCO-style root) and in-memory arrays of the model organism.

Image i of a split is drawn from its own generator `default_rng([seed, split_id, i])`, so the first n images do
not depend on how many are made, and `make_arrays` and `write_dataset` agree image by image: the first reference
caption of image i in `captions_<split>.json` is the caption `make_arrays` returns for it.

Layout written by `write_dataset(root, ...)`:
  <root>/annotations/instances_<split>.json   COCO instances (images, annotations with pixel bboxes, categories)
  <root>/annotations/captions_<split>.json    COCO captions (1 to 3 reference captions per image)
  <root>/annotations/scenes_<split>.json      per-image scene records (scene type, trap, expected_absent, ...)
  <root>/<split>/<file_name>                  PNG images
  <root>/synonyms.txt                         vocabulary in the coco_chair_synonyms.txt format
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from PIL import Image

from air_jax.atomic import atomic_write_json
from organism.scenes import SPLITS, Scene, caption, object_boxes, reference_captions, render, sample_scene
from organism.vocab import CLASS_BY_NAME, CLASSES, write_synonyms

SPLIT_IDS: dict[str, int] = {"train": 0, "test": 1}
# Image ids are unique across splits: test ids start after this offset.
ID_OFFSET: dict[str, int] = {"train": 1, "test": 1_000_001}
MAX_REFERENCES = 3


def _image_rng(seed: int, split: str, i: int, stream: int = 0) -> np.random.Generator:
  return np.random.default_rng([seed, SPLIT_IDS[split], i, stream])


def _check(n: int, seed: int, split: str, what: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  if not isinstance(n, (int, np.integer)) or n < 0:
    raise ValueError(f"{what} must be a non-negative int, got {n!r}")
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed must be a non-negative int, got {seed!r}")


def make_scene(i: int, seed: int, split: str) -> tuple[Scene, str]:
  """Scene and primary caption of image i of a split."""
  rng = _image_rng(seed, split, i)
  scene = sample_scene(rng, split)
  return scene, caption(scene, rng)


def make_arrays(n: int, seed: int, split: str, size: int = 64) -> tuple[np.ndarray, list[str], list[Scene]]:
  """Makes n images with their primary captions in memory (no disk access).

  Args:
    n: number of images.
    seed: dataset seed.
    split: "train" or "test".
    size: image side in pixels.

  Returns:
    (images uint8 [n, size, size, 3], captions, scenes).
  """
  _check(n, seed, split, "n")
  images = np.empty((n, size, size, 3), np.uint8)
  captions, scenes = [], []
  for i in range(n):
    scene, cap = make_scene(i, seed, split)
    images[i] = render(scene, size)
    captions.append(cap)
    scenes.append(scene)
  return images, captions, scenes


def _write_json(path: str, obj: Any) -> None:
  """Writes JSON atomically with a fixed format (sorted keys, no spaces) so output is byte-reproducible."""
  atomic_write_json(path, obj, newline=True, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _write_split(root: str, split: str, n: int, seed: int, size: int) -> None:
  img_dir = os.path.join(root, split)
  os.makedirs(img_dir, exist_ok=True)
  images, instances, captions, scene_records = [], [], [], []
  for i in range(n):
    scene, first = make_scene(i, seed, split)
    image_id = ID_OFFSET[split] + i
    file_name = add_image(scene, image_id, split, img_dir, size, images, instances)
    rng = _image_rng(seed, split, i, stream=1)
    k = int(rng.integers(1, MAX_REFERENCES + 1))
    for cap in reference_captions(scene, rng, first, k):
      captions.append({"id": len(captions) + 1, "image_id": image_id, "caption": cap})
    scene_records.append({"image_id": image_id, "file_name": file_name, **scene.to_dict()})
  info = {"description": f"model-organism synthetic scenes, split {split}, seed {seed}", "version": "1"}
  write_annotations(root, split, info, images, instances, captions, scene_records)


def add_image(scene, image_id: int, split: str, img_dir: str, size: int, images: list, instances: list) -> str:
  """Renders `scene` as a PNG in img_dir and appends its COCO image record and one instance record per object
  (to `images`, `instances`); returns the file name."""
  file_name = f"{split}_{image_id:07d}.png"
  Image.fromarray(render(scene, size)).save(os.path.join(img_dir, file_name), format="PNG")
  images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
  for name, box, area in object_boxes(scene, size):
    instances.append({"id": len(instances) + 1, "image_id": image_id, "category_id": CLASS_BY_NAME[name].id,
                      "bbox": box, "area": area, "iscrowd": 0})
  return file_name


def write_annotations(root: str, split: str, info: dict, images: list, instances: list, captions: list,
                      scenes: list) -> None:
  """annotations/{instances,captions,scenes}_{split}.json of one split (COCO layout plus the scene records)."""
  ann = os.path.join(root, "annotations")
  categories = [{"id": c.id, "name": c.name, "supercategory": c.scene} for c in CLASSES]
  _write_json(os.path.join(ann, f"instances_{split}.json"),
              {"info": info, "images": images, "annotations": instances, "categories": categories})
  _write_json(os.path.join(ann, f"captions_{split}.json"), {"info": info, "images": images, "annotations": captions})
  _write_json(os.path.join(ann, f"scenes_{split}.json"), {"info": info, "scenes": scenes})


def write_dataset(root: str | os.PathLike, n_train: int, n_test: int, seed: int, size: int = 64) -> None:
  """Writes a COCO-style dataset root with splits `train` and `test` (see the module docstring for the layout).

  Args:
    root: output directory (created; existing files of the same names are overwritten).
    n_train: number of train images.
    n_test: number of test images.
    seed: dataset seed; the same seed gives byte-identical files.
    size: image side in pixels.
  """
  _check(n_train, seed, "train", "n_train")
  _check(n_test, seed, "test", "n_test")
  root = os.fspath(root)
  os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
  _write_split(root, "train", n_train, seed, size)
  _write_split(root, "test", n_test, seed, size)
  write_synonyms(os.path.join(root, "synonyms.txt"))
