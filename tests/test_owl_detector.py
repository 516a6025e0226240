"""OWL-ViT / OWLv2 in JAX equal transformers' detectors on tiny random checkpoints; the Detector interface."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.tiny import train_tokenizer


def _make(path, version):
  from transformers import (OwlViTConfig, OwlViTForObjectDetection, Owlv2Config, Owlv2ForObjectDetection,
                            Owlv2ImageProcessorPil, Owlv2Processor, OwlViTImageProcessor, OwlViTProcessor)

  torch.manual_seed(version)
  text = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=16)
  vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                patch_size=8)
  cfg_cls, model_cls = (Owlv2Config, Owlv2ForObjectDetection) if version == 2 else (OwlViTConfig,
                                                                                    OwlViTForObjectDetection)
  model = model_cls(cfg_cls(text_config=text, vision_config=vision, projection_dim=32)).eval()
  model.save_pretrained(path)
  tok = train_tokenizer(96)
  tok.padding_side = "right"
  if version == 2:
    proc = Owlv2Processor(image_processor=Owlv2ImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tok)
  else:
    proc = OwlViTProcessor(image_processor=OwlViTImageProcessor(size={"height": 32, "width": 32},
                                                                crop_size={"height": 32, "width": 32}),
                           tokenizer=tok)
  proc.save_pretrained(path)
  return model


@pytest.fixture(scope="module", params=[1, 2], ids=["owlvit", "owlv2"])
def owl(request, tmp_path_factory):
  path = str(tmp_path_factory.mktemp(f"owl{request.param}"))
  return request.param, path, _make(path, request.param)


def test_detect_equals_transformers(owl):
  import jax.numpy as jnp

  from convert.hf_owl import load_owl
  from models import owl as owl_model

  version, path, torch_model = owl
  params, cfg = load_owl(path)
  assert cfg.version == version
  rng = np.random.RandomState(0)
  pixels = rng.randn(2, 3, 32, 32).astype(np.float32)
  ids = rng.randint(4, 90, size=(6, 16))  # 2 images x 3 queries
  ids[np.arange(6), rng.randint(3, 16, size=6)] = 95  # the "end of text" (largest id) is where OWL pools
  mask = np.ones_like(ids)
  mask[1, 12:] = 0
  ids[5, 0] = 0  # a padding query (first id 0) of image 1
  with torch.no_grad():
    ref = torch_model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels),
                      attention_mask=torch.tensor(mask))
  out = owl_model.detect(jax_tree(params), cfg, jnp.asarray(pixels), jnp.asarray(ids), jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(out["pred_boxes"]), ref.pred_boxes.numpy(), atol=1e-5, rtol=1e-5)
  got, want = np.asarray(out["logits"]), ref.logits.numpy()
  np.testing.assert_array_equal(got <= -1e30, want <= -1e30)  # the padding query is masked on both sides
  live = want > -1e30
  np.testing.assert_allclose(got[live], want[live], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(out["class_embeds"]), ref.class_embeds.numpy(), atol=1e-5, rtol=1e-5)
  if version == 2:
    np.testing.assert_allclose(np.asarray(out["objectness_logits"]), ref.objectness_logits.numpy(), atol=1e-5,
                               rtol=1e-5)


def jax_tree(params):
  import jax

  return jax.tree.map(jax.numpy.asarray, params)


def test_owl_detector_interface(owl):
  from air_jax.detectors import OwlDetector

  version, path, _ = owl
  det = OwlDetector(path)
  img = Image.new("RGB", (48, 32), (200, 30, 30))
  res = det.detect(img, ["cat", "dog"], threshold=0.0)
  assert [d.word for d in res] == ["cat", "dog"]
  for d in res:
    assert d.boxes.shape == (16, 4) and d.scores.shape == (16,)
    assert np.all(np.diff(d.scores) <= 0)
  raw = det.raw(img, ["cat", "dog"])
  probs = 1 / (1 + np.exp(-raw["logits"][0, :, 0]))
  np.testing.assert_allclose(np.sort(probs)[::-1], res[0].scores, rtol=1e-6)
  assert det.identity.startswith(("owlv2:", "owlvit:"))
  assert det.detect(img, ["cat"], threshold=0.999999)[0].boxes.shape == (0, 4)
  with pytest.raises(ValueError, match="threshold"):
    det.detect(img, ["cat"], threshold=1.5)


def test_missing_detector_checkpoint_is_clear(tmp_path):
  from air_jax.detectors import OwlDetector

  with pytest.raises(FileNotFoundError, match="no config.json"):
    OwlDetector(tmp_path / "nowhere")
