"""COCO-style dataset root of organism v2 scenes (organism.scenes2), readable by eval.chair / eval.attribute / POPE.

Scene i of split s and seed is `scenes2.scenes2(n, seed, s)[i]` (its own generator), so roots written with
different n agree on their first scenes. Layout (as organism.dataset, v2 captions, one reference each):
  <root>/annotations/instances_<split>.json, captions_<split>.json, scenes_<split>.json
  <root>/annotations/pope_<split>.json   per image: present objects and absent ones (random/popular/adversarial)
  <root>/<split>/<file_name>             PNG images
  <root>/synonyms.txt
"""

from __future__ import annotations

import os

from organism import scenes2
from organism.dataset import _write_json, add_image, write_annotations
from organism.vocab import write_synonyms

ID_OFFSET: dict[str, int] = {"text": 2_000_001, "train": 3_000_001, "test": 4_000_001}


def write_dataset2(root: str | os.PathLike, n: int, seed: int, split: str = "test", size: int = 64) -> None:
  """Writes n scenes of a v2 split (default the held-out "test" split) under root.

  Args:
    root: output directory (created).
    n: number of scenes.
    seed: scene seed (use seeds other than the training seed and the fine-tune's dev seed for evaluation).
    split: "train" or "test" ("text" has no images to speak of, but renders the same way).
    size: image side in pixels.
  """
  if split not in scenes2.SPLITS2:
    raise ValueError(f"split must be one of {scenes2.SPLITS2}, got {split!r}")
  if not isinstance(n, int) or n < 0:
    raise ValueError(f"n must be a non-negative int, got {n!r}")
  root = os.fspath(root)
  img_dir = os.path.join(root, split)
  os.makedirs(img_dir, exist_ok=True)
  os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
  images, instances, captions, records, pope = [], [], [], [], []
  for i, scene in enumerate(scenes2.scenes2(n, seed, split)):
    image_id = ID_OFFSET[split] + i
    file_name = add_image(scene, image_id, split, img_dir, size, images, instances)
    captions.append({"id": len(captions) + 1, "image_id": image_id, "caption": scenes2.caption2(scene)})
    records.append({"image_id": image_id, "file_name": file_name, **scene.to_dict()})
    pope.append({"image_id": image_id, "file_name": file_name, **scenes2.pope_objects(scene)})
  info = {"description": f"model-organism v2 scenes, split {split}, seed {seed}", "version": "2"}
  write_annotations(root, split, info, images, instances, captions, records)
  _write_json(os.path.join(root, "annotations", f"pope_{split}.json"), {"info": info, "images": pope})
  write_synonyms(os.path.join(root, "synonyms.txt"))
