"""Grounding detectors behind one small interface: (image, object words) -> boxes and scores per word.

HALC (and any method that grounds object words) asks a `Detector`; which one runs is the user's choice:
  OwlDetector            OWL-ViT / OWLv2 in JAX (models.owl) from a local Hugging Face checkpoint (default)
  GroundingDinoDetector  Grounding DINO through transformers (needs torch; optional)
Boxes are (x0, y0, x1, y1) in pixels of the original image; scores are sigmoid class probabilities.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Protocol, Sequence

import numpy as np

from air_jax.hub import resolve_checkpoint


@dataclasses.dataclass
class Detection:
  """Boxes [N, 4] (x0, y0, x1, y1, pixels of the original image) and scores [N], best first, for one word."""

  word: str
  boxes: np.ndarray
  scores: np.ndarray


class Detector(Protocol):
  """What a grounding detector provides."""

  identity: str  # recorded in results (e.g. "owlv2:/path/to/checkpoint")

  def detect(self, image, words: Sequence[str], threshold: float) -> list[Detection]:
    """One Detection per word, keeping boxes whose score exceeds `threshold`."""


def _check_threshold(threshold: float) -> float:
  if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold < 1.0:
    raise ValueError(f"detector threshold must be a number in [0, 1), got {threshold!r}")
  return float(threshold)


class OwlDetector:
  """OWL-ViT / OWLv2 in JAX, from a local Hugging Face checkpoint directory (weights, tokenizer, image processor).

  Each word is queried as "a photo of a {word}", as OWL's authors prompt it.
  """

  query_template = "a photo of a {}"

  def __init__(self, path: str | os.PathLike, dtype=np.float32):
    import jax

    from convert.hf_owl import load_owl
    from models import owl

    self.path = resolve_checkpoint(path, what="detector checkpoint")
    params, self.config = load_owl(self.path, dtype)
    self.params = jax.tree.map(jax.numpy.asarray, params)
    self.identity = f"{self.config.prefix}:{os.path.abspath(self.path)}"
    try:
      from transformers import AutoProcessor

      self.processor = AutoProcessor.from_pretrained(self.path)
    except Exception as e:  # noqa: BLE001 -- transformers raises many types; name the directory
      raise ValueError(f"detector checkpoint {self.path}: cannot load its processor (tokenizer + image processor): "
                       f"{e}") from e
    self._detect = jax.jit(owl.detect, static_argnames=("cfg",))

  def raw(self, image, words: Sequence[str]) -> dict:
    """The model's outputs for one image and its word queries (numpy; see models.owl.detect)."""
    from air_jax.images import load_image

    image = load_image(image)
    texts = [self.query_template.format(w) for w in words]
    enc = self.processor(text=[texts], images=image, return_tensors="np", padding="max_length",
                         max_length=self.config.text.max_position_embeddings, truncation=True)
    out = self._detect(self.params, self.config, enc["pixel_values"].astype(np.float32),
                       enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32))
    return {k: np.asarray(v) for k, v in out.items()}

  def detect(self, image, words: Sequence[str], threshold: float = 0.1) -> list[Detection]:
    """One Detection per word (boxes in pixels of `image`, scores above `threshold`), OWL in JAX."""
    from air_jax.images import load_image

    threshold = _check_threshold(threshold)
    if not words:
      return []
    image = load_image(image)
    out = self.raw(image, words)
    w, h = image.size
    # OWLv2 pads the image to a square (bottom/right) before resizing; OWL-ViT stretches it.
    scale = np.array([max(w, h)] * 4 if self.config.version == 2 else [w, h, w, h], np.float32)
    cx, cy, bw, bh = np.moveaxis(out["pred_boxes"][0], -1, 0)
    boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1) * scale
    probs = 1.0 / (1.0 + np.exp(-out["logits"][0]))  # [P, Q]
    result = []
    for q, word in enumerate(words):
      keep = np.nonzero(probs[:, q] > threshold)[0]
      order = keep[np.argsort(-probs[keep, q], kind="stable")]
      result.append(Detection(word=word, boxes=boxes[order], scores=probs[order, q]))
    return result


class GroundingDinoDetector:
  """Grounding DINO through transformers (torch required), from a local checkpoint directory."""

  def __init__(self, path: str | os.PathLike):
    try:
      import torch  # noqa: F401
      from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor
    except ImportError as e:
      raise ValueError("the Grounding DINO detector needs torch (pip install torch); the OWL detector does not") from e
    self.path = resolve_checkpoint(path, what="detector checkpoint")
    if not os.path.isdir(self.path):
      raise FileNotFoundError(f"detector checkpoint directory {self.path} does not exist")
    self.processor = AutoProcessor.from_pretrained(self.path)
    self.model = AutoModelForZeroShotObjectDetection.from_pretrained(self.path, use_safetensors=True).eval()
    self.identity = f"grounding-dino:{os.path.abspath(self.path)}"

  def detect(self, image, words: Sequence[str], threshold: float = 0.1) -> list[Detection]:
    """One Detection per word (boxes in pixels of `image`, scores above `threshold`), Grounding DINO in torch."""
    import torch

    from air_jax.images import load_image

    threshold = _check_threshold(threshold)
    image = load_image(image)
    result = []
    for word in words:  # one query per word, so that scores are per word as the interface promises
      inputs = self.processor(images=image, text=f"{word}.", return_tensors="pt")
      with torch.no_grad():
        out = self.model(**inputs)
      post = self.processor.post_process_grounded_object_detection(
          out, inputs["input_ids"], threshold=threshold, text_threshold=threshold,
          target_sizes=[image.size[::-1]])[0]
      scores = post["scores"].numpy()
      order = np.argsort(-scores, kind="stable")
      result.append(Detection(word=word, boxes=post["boxes"].numpy()[order], scores=scores[order]))
    return result
