"""Beam search in the compiled loop equals transformers' `num_beams` generate (tokens), batched and alone."""

import numpy as np
import pytest
import torch

import air_jax
from air_jax import beam_search
from air_jax.generate import eos_token_ids, pad_token_id
from tests.conftest import PROMPTS, hf_inputs
from tests.tiny import random_images

N = 32


def _ours(model, images, prompts, k, eos=None, n=N, length_penalty=1.0, early_stopping=False):
  ids, mask, pixels = air_jax.generate_inputs(model, images, prompts)
  tok = model.processor.tokenizer
  eos = eos_token_ids(model.config, tok) if eos is None else eos
  out = beam_search.beam_search_jit(model.params, model.config, ids, mask, pixels, None, num_beams=k,
                                    max_new_tokens=n, eos_ids=tuple(eos), pad_id=pad_token_id(tok),
                                    length_penalty=length_penalty, early_stopping=early_stopping)
  return np.asarray(out["tokens"]), np.asarray(out["num_tokens"])


def _theirs(model, processor, images, prompts, k, eos=None, n=N, length_penalty=1.0, early_stopping=False):
  inputs = hf_inputs(processor, images, prompts)
  inputs.pop("position_ids")
  kw = {} if eos is None else {"eos_token_id": list(eos)}
  with torch.no_grad():
    out = model.generate(**inputs, max_new_tokens=n, do_sample=False, num_beams=k, length_penalty=length_penalty,
                         pad_token_id=processor.tokenizer.pad_token_id, early_stopping=early_stopping, **kw)
  return out[:, inputs["input_ids"].shape[1]:].numpy()


def _check(ours, theirs, pad):
  tokens, num = ours
  for row in range(tokens.shape[0]):
    want = theirs[row]
    got = tokens[row, :num[row]]
    np.testing.assert_array_equal(got, want[:num[row]])
    assert np.all(want[num[row]:] == pad)  # transformers pads the shorter rows of the batch


@pytest.mark.parametrize("k", [1, 3])
def test_beam_search_equals_transformers(tiny_model, tiny_torch, k):
  images = random_images(2, 28, seed=11)
  ours = _ours(tiny_model, images, PROMPTS, k)
  theirs = _theirs(tiny_torch, tiny_model.processor, images, PROMPTS, k)
  _check(ours, theirs, tiny_model.processor.tokenizer.pad_token_id)


def test_beam_search_with_early_eos_and_length_penalty(tiny_model, tiny_torch):
  """A frequent token declared EOS makes beams finish early: the finished-beam bookkeeping is exercised."""
  images = random_images(2, 28, seed=12)
  greedy = air_jax.generate(tiny_model, None, images, PROMPTS, max_new_tokens=N).token_ids
  values, counts = np.unique(greedy[:, 3:], return_counts=True)
  eos = (int(values[np.argmax(counts)]),)
  for lp in (1.0, 0.5):
    ours = _ours(tiny_model, images, PROMPTS, 4, eos=eos, length_penalty=lp)
    assert np.any(ours[1] < N)  # some beam finished before N tokens
    theirs = _theirs(tiny_torch, tiny_model.processor, images, PROMPTS, 4, eos=eos, length_penalty=lp)
    _check(ours, theirs, tiny_model.processor.tokenizer.pad_token_id)
  # early_stopping=True (transformers' option): the search ends once num_beams hypotheses are finished; "never":
  # the heuristic scores the best running beam at the longest reachable length.
  for early in (True, "never"):
    for lp in (2.0, 1.0):
      stop = _ours(tiny_model, images, PROMPTS, 4, eos=eos, length_penalty=lp, early_stopping=early)
      _check(stop, _theirs(tiny_torch, tiny_model.processor, images, PROMPTS, 4, eos=eos, length_penalty=lp,
                           early_stopping=early), tiny_model.processor.tokenizer.pad_token_id)
  # A stop token and penalty where "never" searches on (32 tokens) past the point where False stops (2 tokens).
  late = (int(values[np.argsort(-counts, kind="stable")][3]),)
  runs = {}
  for early in (False, "never"):
    runs[early] = _ours(tiny_model, images, PROMPTS, 4, eos=late, length_penalty=1.5, early_stopping=early)
    _check(runs[early], _theirs(tiny_torch, tiny_model.processor, images, PROMPTS, 4, eos=late, length_penalty=1.5,
                                early_stopping=early), tiny_model.processor.tokenizer.pad_token_id)
  assert not np.array_equal(runs[False][1], runs["never"][1])
  alone = _ours(tiny_model, images[1], PROMPTS[1], 4, eos=eos, length_penalty=0.5)  # a batch row run alone
  np.testing.assert_array_equal(alone[0][0, :alone[1][0]], ours[0][1, :ours[1][1]])


def test_generate_num_beams_and_bad_settings(tiny_model, tiny_torch):
  images = random_images(2, 28, seed=11)
  out = air_jax.generate(tiny_model, None, images, PROMPTS, max_new_tokens=N, num_beams=3)
  theirs = _theirs(tiny_torch, tiny_model.processor, images, PROMPTS, 3)
  _check((out.token_ids, out.num_tokens), theirs, tiny_model.processor.tokenizer.pad_token_id)
  assert out.texts[0] == tiny_model.processor.tokenizer.decode(out.token_ids[0, :out.num_tokens[0]],
                                                               skip_special_tokens=True).strip()
  for bad in (0, 2.5, True):
    with pytest.raises(ValueError, match="num_beams"):
      air_jax.generate(tiny_model, None, images[0], PROMPTS[0], max_new_tokens=4, num_beams=bad)
  with pytest.raises(ValueError, match="do_sample"):
    air_jax.generate(tiny_model, None, images[0], PROMPTS[0], max_new_tokens=4, num_beams=2, do_sample=True)
  # early_stopping reaches the search; a value transformers does not know is refused by name.
  out = air_jax.generate(tiny_model, None, images, PROMPTS, max_new_tokens=N, num_beams=3, length_penalty=2.0,
                         early_stopping=True)
  direct = _ours(tiny_model, images, PROMPTS, 3, length_penalty=2.0, early_stopping=True)
  np.testing.assert_array_equal(out.token_ids, direct[0])
  with pytest.raises(ValueError, match="early_stopping must be True, False or \"never\".*got 'always'"):
    air_jax.generate(tiny_model, None, images[0], PROMPTS[0], max_new_tokens=4, num_beams=2, early_stopping="always")
