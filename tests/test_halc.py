"""HALC (air_jax.methods.halc, air_jax.halc_search, air_jax.fov) equals its torch reference (tests/halc_reference.py)
on a tiny LLaVA: per object word the same box status, candidates and choice, and the same tokens; with a stub
detector, with the official JSD / contrast / matching selection, and with a real (tiny random) OWLv2 detector.
A batch equals its rows run alone; bad settings are clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import air_jax
from air_jax.detectors import Detection
from tests.conftest import hf_inputs
from tests.tiny import random_images

PROMPT = "Please describe this image in detail."
N = 24


class StubDetector:
  """Deterministic boxes per word: none for some words (fallback box), 4 for some (more than max_boxes 3)."""

  identity = "stub"

  def detect(self, image, words, threshold):
    w, h = image.size
    out = []
    for word in words:
      k = sum(map(ord, word)) % 4
      if k == 0:
        boxes = np.zeros((0, 4))
      elif k == 3:
        boxes = np.array([[0, 0, 9, 9], [2, 2, 20, 20], [5, 1, 15, 25], [1, 6, 27, 22]], np.float64)
      else:
        boxes = np.array([[1 + 3 * k, 2, w - 3, h - 2 * k], [4, 5, 4 + 2 * k + 9, 21]], np.float64)
      out.append(Detection(word=word, boxes=boxes, scores=np.ones(len(boxes))))
    return out


def length_scorer(image, texts):
  """A deterministic stand-in for the official BLIP matching score."""
  del image
  return [((len(t) * 7919) % 97) / 97.0 for t in texts]


@pytest.fixture(scope="module")
def images():
  return random_images(3, 28, seed=5)


def greedy_words_synonyms(model, images, prompt, n, path, min_words: int = 4) -> str:
  """A CHAIR synonyms file at `path` whose 'objects' are the words greedy writes for these images (a random tiny
  model writes no English), so that object words occur."""
  from air_jax.halc_search import _PUNCT, starts_word, word_tables
  from eval.chair_metric import Vocabulary, singularize

  g = air_jax.generate(model, None, images, prompt, max_new_tokens=n)
  tok = model.processor.tokenizer
  tab = word_tables(tok, Vocabulary.from_synonyms([["zz"]], rules="generic"), model.config.dims.vocab_size)
  found = set()
  for r in range(len(images)):
    ids = g.token_ids[r, : g.num_tokens[r]].tolist()
    cuts = [i for i, t in enumerate(ids) if starts_word(tab, t, ids[i - 1] if i else None)] + [len(ids)]
    for a, b in zip(cuts[:-1], cuts[1:]):
      w = tok.decode(ids[a:b], skip_special_tokens=True).strip().strip(_PUNCT).lower()
      if w and " " not in w:
        found.add(singularize(w))
  assert len(found) >= min_words
  path.write_text("\n".join(sorted(found)) + "\n")
  return str(path)


@pytest.fixture(scope="module")
def synonyms(tiny_model, images, tmp_path_factory):
  return greedy_words_synonyms(tiny_model, images, PROMPT, N, tmp_path_factory.mktemp("halc") / "synonyms.txt")


def ours(tiny_model, cfg, images, trace=None):
  """HALC through the method's search (the same call generate makes), with the per-word trace."""
  import jax.numpy as jnp

  from air_jax.generate import eos_token_ids, generate_inputs, pad_token_id

  compiled = air_jax.methods.as_compiled(cfg, tiny_model.config)
  ids, mask, pix = generate_inputs(tiny_model, images, PROMPT)
  tok = tiny_model.processor.tokenizer
  return compiled.plan.search(compiled.values, tiny_model.params, tiny_model.config, jnp.asarray(ids),
                              jnp.asarray(mask), jnp.asarray(pix), max_new_tokens=N,
                              eos_ids=eos_token_ids(tiny_model.config, tok), pad_id=pad_token_id(tok),
                              processor=tiny_model.processor, trace=trace)


def reference(tiny_torch, tiny_model, cfg, images, row):
  from air_jax.generate import eos_token_ids
  from air_jax.methods.halc import load_vocabulary
  from tests.halc_reference import reference_halc

  proc = tiny_model.processor
  inputs = hf_inputs(proc, [images[row]], [PROMPT])
  trace = []
  toks = reference_halc(tiny_torch, proc, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                        vocab=load_vocabulary(cfg.synonyms), detector=cfg.resolve_detector(), max_new_tokens=N,
                        eos_ids=set(eos_token_ids(tiny_model.config, proc.tokenizer)), num_fovs=cfg.num_fovs,
                        expand_ratio=cfg.expand_ratio, box_threshold=cfg.box_threshold, num_pairs=cfg.num_pairs,
                        alpha=cfg.alpha, beta=cfg.beta, max_boxes=cfg.max_boxes, jsd_mode=cfg.jsd,
                        contrast_mode=cfg.contrast, selection=cfg.selection, scorer=cfg.scorer, trace=trace)
  return toks, trace


def check_equal(tiny_torch, tiny_model, cfg, images):
  trace = []
  out = ours(tiny_model, cfg, images, trace)
  statuses = []
  for r in range(len(images)):
    want, want_trace = reference(tiny_torch, tiny_model, cfg, images, r)
    got = out["tokens"][r, : out["num_tokens"][r]].tolist()
    got_trace = [e for e in trace if e["row"] == r]
    assert [(e["position"], e["word"], e["status"]) for e in got_trace] == \
        [(e["position"], e["word"], e["status"]) for e in want_trace], f"row {r}"
    for g, w in zip(got_trace, want_trace):
      if w["status"] != "skipped":
        np.testing.assert_allclose(g["jsd"], w["jsd"], rtol=1e-3, atol=1e-6)
        assert g["candidates"] == w["candidates"] and g["chosen"] == w["chosen"], f"row {r} word {w['word']}"
    assert got == want, f"row {r}"
    statuses += [e["status"] for e in want_trace]
  return out, statuses


def test_matches_reference_stub_detector(tiny_torch, tiny_model, images, synonyms):
  cfg = air_jax.methods.make("halc", detector=StubDetector(), synonyms=synonyms)
  out, statuses = check_equal(tiny_torch, tiny_model, cfg, images)
  assert out["corrections"].sum() > 0  # some object words were re-decided (rolled back)
  assert {"detected", "not-detected", "skipped"} <= set(statuses)
  greedy = air_jax.generate(tiny_model, None, images, PROMPT, max_new_tokens=N)
  assert not np.array_equal(out["tokens"], greedy.token_ids)


def test_matches_reference_official_modes(tiny_torch, tiny_model, images, synonyms):
  cfg = air_jax.methods.make("halc", detector=StubDetector(), synonyms=synonyms, jsd="official",
                             contrast="official", num_pairs=2, selection="matching", scorer=length_scorer,
                             num_fovs=3, expand_ratio=0.9, max_boxes=None, alpha=0.5)
  check_equal(tiny_torch, tiny_model, cfg, images)


@pytest.fixture(scope="module")
def owl_dir(tmp_path_factory):
  from tests.test_owl_detector import _make

  path = str(tmp_path_factory.mktemp("owl_halc"))
  _make(path, 2)
  return path


def test_matches_reference_owl_detector(tiny_torch, tiny_model, images, synonyms, owl_dir):
  cfg = air_jax.methods.make("halc", detector_path=owl_dir, synonyms=synonyms, box_threshold=0.5, max_boxes=None)
  _, statuses = check_equal(tiny_torch, tiny_model, cfg, images[:2])
  assert "detected" in statuses


def test_batch_equals_rows_alone(tiny_model, images, synonyms):
  cfg = air_jax.methods.make("halc", detector=StubDetector(), synonyms=synonyms)
  batch = air_jax.generate(tiny_model, cfg, images, PROMPT, max_new_tokens=N)
  for r in range(len(images)):
    alone = air_jax.generate(tiny_model, cfg, [images[r]], PROMPT, max_new_tokens=N)
    assert alone.texts[0] == batch.texts[r]
    np.testing.assert_array_equal(alone.token_ids[0], batch.token_ids[r])


@pytest.mark.parametrize("boxes, size", [
    ([[100, 100, 120, 120], [50, 50, 250, 250]], (336, 336)),  # a tiny box beside a real one: dropped
    ([[0, 0, 100, 100], [2, 2, 100, 100], [150, 150, 250, 250], [200, 0, 300, 100]], (336, 336)),  # a duplicate
    ([[20, 120, 60, 200], [100, 10, 200, 90]], (336, 100)),  # a box in the padding below: zero area once clipped
    ([[0, 0, 3, 3]], (336, 336)),  # nothing left: the fallback box
    ([[0, 0, 90, 90], [100, 0, 190, 90], [200, 0, 290, 90], [0, 100, 90, 190]], (336, 336)),  # 4 instances
])
def test_target_box_filters_as_the_official_extract_detection(boxes, size):
  """Official detector.py: area < 0.01 and IoU > 0.6 to a kept box are dropped before max_handle_box and the
  smallest-box choice (tests.halc_reference re-creates it from the official code)."""
  from air_jax.halc_search import target_box
  from tests.halc_reference import FALLBACK, extract_detection

  det = Detection(word="dog", boxes=np.asarray(boxes, np.float64), scores=np.ones(len(boxes)))
  got, status = target_box(det, size, 3)
  kept = extract_detection(boxes, size)
  if len(kept) > 3:
    assert (got, status) == (None, "skipped")
  elif not kept:
    assert status == "not-detected" and np.allclose(got, FALLBACK)
  else:
    areas = [(b[2] - b[0]) * (b[3] - b[1]) for b in kept]
    assert status == "detected" and np.allclose(got, kept[areas.index(min(areas))])
    assert (got[2] - got[0]) * (got[3] - got[1]) >= 0.01


def test_fov_pieces_equal_torch():
  import jax.numpy as jnp

  from air_jax import fov
  from tests import halc_reference as ref

  np.testing.assert_allclose(fov.fov_boxes((0.3, 0.2, 0.5, 0.6), 4, 0.6), ref.fov_boxes((0.3, 0.2, 0.5, 0.6), 4, 0.6))
  np.testing.assert_allclose(fov.fov_boxes((0.1, 0.1, 0.9, 0.5), 3, 1.5), ref.fov_boxes((0.1, 0.1, 0.9, 0.5), 3, 1.5))
  rng = np.random.default_rng(0)
  pix = rng.normal(size=(1, 3, 12, 10)).astype(np.float32)
  for box in [(0.2, 0.1, 0.7, 0.8), (0.0, 0.0, 1.0, 1.0), (0.55, 0.3, 0.6, 0.35)]:
    got = np.asarray(fov.crop_resize(jnp.asarray(pix[0]), jnp.asarray(box, jnp.float32)))
    np.testing.assert_allclose(got, ref.crop(torch.tensor(pix), list(box))[0].numpy(), atol=1e-5)
  np.testing.assert_allclose(np.asarray(fov.crop_resize(jnp.asarray(pix[0]), jnp.asarray([0., 0., 1., 1.]))),
                             pix[0], atol=1e-6)  # the whole image is the identity
  logits = rng.normal(size=(3, 50)).astype(np.float32) * 3
  for mode in ("paper", "official"):
    m = np.asarray(fov.jsd_matrix(jnp.asarray(logits), mode))
    want = ref.jsd(torch.tensor(logits[:1]), torch.tensor(logits[2:]), mode)
    np.testing.assert_allclose(m[0, 2], want, rtol=1e-5)
    assert m[0, 0] == pytest.approx(0.0, abs=1e-7)
  assert np.asarray(fov.jsd_matrix(jnp.asarray(logits), "paper"))[0, 1] != pytest.approx(
      float(np.asarray(fov.jsd_matrix(jnp.asarray(logits), "official"))[0, 1]), rel=1e-6)


@pytest.mark.parametrize("field,value,match", [
    ("num_fovs", 0, "num_fovs"), ("num_fovs", 1, "num_fovs"), ("expand_ratio", 0.0, "expand_ratio"),
    ("expand_ratio", -0.5, "expand_ratio"), ("box_threshold", 0.0, "box_threshold"),
    ("box_threshold", 1.5, "box_threshold"), ("num_pairs", 7, "num_pairs"), ("num_beams", 2, "num_beams"),
    ("beta", 0.0, "beta"), ("jsd", "kl", "jsd"), ("selection", "matching", "scorer"),
    ("min_box_area", 1.0, "min_box_area"), ("min_box_area", -0.1, "min_box_area"), ("box_iou", 0.0, "box_iou")])
def test_bad_settings(field, value, match):
  with pytest.raises(ValueError, match=match):
    air_jax.methods.make("halc", **{field: value})


def test_detector_checkpoint_errors(tiny_model, tmp_path, monkeypatch):
  from air_jax.methods.halc import DETECTOR_ENV

  monkeypatch.delenv(DETECTOR_ENV, raising=False)
  with pytest.raises(ValueError, match="detector_path is not set"):
    air_jax.methods.as_compiled(air_jax.methods.make("halc"), tiny_model.config)
  with pytest.raises(ValueError, match="detector_path=.*not a directory"):
    air_jax.methods.as_compiled(air_jax.methods.make("halc", detector_path=str(tmp_path / "nope")),
                                tiny_model.config)
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(ValueError, match="detector_path=.*not a usable OWL"):
    air_jax.methods.as_compiled(air_jax.methods.make("halc", detector_path=str(tmp_path)), tiny_model.config)


def test_pixel_layout_is_checked(tiny_model):
  from air_jax.halc_search import check_pixel_layout

  check_pixel_layout((2, 3, 28, 28), tiny_model.config)
  check_pixel_layout((2, 5, 3, 28, 28), tiny_model.config)  # tiles
  with pytest.raises(ValueError, match="cannot be cropped"):
    check_pixel_layout((2, 1024, 1176), tiny_model.config)  # flattened patch rows (Qwen-style)


def test_out_of_slots_warns(tiny_model, images, synonyms):
  cfg = air_jax.methods.make("halc", detector=StubDetector(), synonyms=synonyms, extra_slots=0)
  with pytest.warns(UserWarning, match="ran out of cache slots"):
    out = ours(tiny_model, cfg, images)
  assert out["truncated"].any() and (out["num_tokens"][out["truncated"]] < N).all()
