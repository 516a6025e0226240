"""OPERA (air_jax.methods.opera, air_jax.opera_search) equals a torch reference of the official `opera_beam_search`
on transformers' eager tiny LLaVA, with and without roll-backs; batch rows equal the rows alone; bad settings."""

import numpy as np
import pytest

import air_jax
from air_jax.generate import eos_token_ids, pad_token_id
from air_jax.opera_search import opera_search_jit
from tests.conftest import PROMPTS
from tests.hf_opera_reference import opera as opera_reference
from tests.tiny import random_images

N = 32


@pytest.fixture(scope="module")
def case(tiny_model):
  images = random_images(4, 28, seed=11)
  prompts = PROMPTS * 2
  ids, mask, pixels = air_jax.generate_inputs(tiny_model, images, prompts)
  return images, prompts, ids, mask, pixels


def _ours(model, ids, mask, pixels, cfg, n=N, eos=None):
  c = cfg.compile(model.config)
  tok = model.processor.tokenizer
  eos = eos_token_ids(model.config, tok) if eos is None else eos
  out = opera_search_jit(model.params, model.config, ids, mask, pixels, c.values, num_beams=cfg.num_beams,
                         num_candidates=cfg.num_attn_candidates, max_new_tokens=n,
                         eos_ids=tuple(eos), pad_id=pad_token_id(tok))
  return {k: np.asarray(v) for k, v in out.items()}


def _theirs(model, torch_model, case, row, cfg, n=N, eos=None):
  _, _, ids, mask, pixels = case
  ids = ids[row:row + 1, mask[row].astype(bool)]
  image_id = model.config.image_token_id
  prompt_len = ids.shape[1] - int((ids == image_id).sum()) + 1  # the official LLaVA ids: one token per image
  eos = eos_token_ids(model.config, model.processor.tokenizer) if eos is None else eos
  return opera_reference(torch_model, ids, pixels[row:row + 1], cfg, n, eos, prompt_len, image_id,
                         generated=cfg.length_normalization == "generated")


def _check_row(ours, row, theirs):
  tokens, rollbacks = theirs
  num = ours["num_tokens"][row]
  np.testing.assert_array_equal(ours["tokens"][row, :num], tokens)
  assert ours["rollbacks"][row] == rollbacks


def test_opera_rollbacks_equal_reference(tiny_model, tiny_torch, case):
  """threshold 3 (preset scale 50): roll-backs fire (several for row 2); tokens and counts equal the reference;
  a batch through `generate` (independent searches under vmap) equals the rows alone."""
  images, prompts, ids, mask, pixels = case
  cfg = air_jax.methods.make("opera", threshold=3)
  alone = {row: _ours(tiny_model, ids[row:row + 1], mask[row:row + 1], pixels[row:row + 1], cfg) for row in (0, 2)}
  assert alone[2]["rollbacks"][0] >= 2 and alone[0]["rollbacks"][0] >= 1
  for row in (0, 2):
    _check_row(alone[row], 0, _theirs(tiny_model, tiny_torch, case, row, cfg))
  out = air_jax.generate(tiny_model, cfg, [images[0], images[2]], [prompts[0], prompts[2]], max_new_tokens=N)
  for i, row in enumerate((0, 2)):
    np.testing.assert_array_equal(out.num_tokens[i], alone[row]["num_tokens"][0])
    np.testing.assert_array_equal(out.token_ids[i], alone[row]["tokens"][0])


def test_opera_preset_without_rollback_equals_reference(tiny_model, tiny_torch, case):
  images, prompts, ids, mask, pixels = case
  cfg = air_jax.methods.make("opera")
  ours = _ours(tiny_model, ids[1:2], mask[1:2], pixels[1:2], cfg)
  assert ours["rollbacks"][0] == 0 and ours["num_tokens"][0] >= 24
  _check_row(ours, 0, _theirs(tiny_model, tiny_torch, case, 1, cfg))
  # A frequent token declared EOS: hypotheses end early and the two length normalisations choose differently.
  eos = (6,)
  got = {}
  for norm in ("official", "generated"):
    c = cfg.replace(length_normalization=norm)
    got[norm] = _ours(tiny_model, ids[1:2], mask[1:2], pixels[1:2], c, eos=eos)
    _check_row(got[norm], 0, _theirs(tiny_model, tiny_torch, case, 1, c, eos=eos))
  assert got["official"]["num_tokens"][0] != got["generated"]["num_tokens"][0]


def test_bad_settings_are_clear_errors(tiny_model, case):
  images, prompts = case[:2]
  for field, bad in (("num_beams", 0), ("threshold", 0), ("threshold", -1.0), ("num_attn_candidates", 0),
                     ("scale_factor", 0.0), ("scale_factor", -2.0), ("window_size", 0),
                     ("length_normalization", "whole")):
    with pytest.raises(ValueError, match=f"OperaConfig.{field}"):
      air_jax.methods.make("opera", **{field: bad})
  with pytest.raises(ValueError, match="window_size"):
    air_jax.generate(tiny_model, air_jax.methods.make("opera", window_size=8), images[1], prompts[1],
                     max_new_tokens=9)
  with pytest.raises(ValueError, match="num_beams"):
    air_jax.generate(tiny_model, "opera", images[1], prompts[1], max_new_tokens=4, num_beams=3)
