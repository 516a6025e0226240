"""Head attribution: vmapped ablations equal per-head loops (JAX) and transformers' o_proj pre-hook; word mapping."""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from air_jax import decoding
from air_jax.attribution import Attributor, incremental_offsets
from air_jax.attribution_core import delta_scores, head_logprobs
from air_jax.attribution_words import align_words, caption_tokens, first_token_overlapping, scored_tokens
from eval.chair_metric import Vocabulary, score_caption
from models import llava
from models.spec import RectificationSpec
from tests.tiny import random_images

CAPTION = "A cat sits on a red chair next to a dog."


@pytest.fixture(scope="module")
def case(tiny_model):
  """Prompt + caption ids, pixels and three scored slots (the first caption token among them)."""
  att = Attributor(tiny_model)
  prompt_ids, pixels = att.prompt_inputs(random_images(1, 28, seed=5)[0])
  _, ids, _ = att.caption_inputs(CAPTION)
  seq = np.concatenate([prompt_ids, ids]).astype(np.int32)
  tp = len(prompt_ids)
  positions = [tp, tp + 5, len(seq) - 2]
  return seq, pixels, positions


def _gate(cfg, layer=None, head=None):
  g = jnp.ones((cfg.num_hidden_layers, cfg.num_attention_heads), jnp.float32)
  return RectificationSpec(head_gate=g if layer is None else g.at[layer, head].set(0.0))


def _loop_current_token(model, seq, pixels, positions):
  """Per head and position: the clean cache, then one jitted decode step with the gate (no vmap)."""
  cfg, params = model.config, model.params
  ids = jnp.asarray(seq)[None]
  _, state, _ = decoding.prefill_jit(params, cfg, ids, jnp.ones_like(ids), jnp.asarray(pixels), None, ids.shape[1])
  step = jax.jit(lambda st, tok, spec: decoding.decode_step(params, cfg, st, tok, spec)[0])
  nl, nh = cfg.text.num_hidden_layers, cfg.text.num_attention_heads
  clean, abl = np.zeros(len(positions)), np.zeros((len(positions), nl, nh))
  for i, p in enumerate(positions):
    st = state.replace(write_index=jnp.int32(p - 1), next_position=jnp.array([p - 1], jnp.int32))
    tok = jnp.asarray(seq[p - 1: p])
    clean[i] = jax.nn.log_softmax(step(st, tok, _gate(cfg.text))[0])[seq[p]]
    for l in range(nl):
      for h in range(nh):
        abl[i, l, h] = jax.nn.log_softmax(step(st, tok, _gate(cfg.text, l, h))[0])[seq[p]]
  return clean, abl


def _loop_full_sequence(model, seq, pixels, positions):
  cfg = model.config
  fwd = jax.jit(lambda spec: jax.nn.log_softmax(
      llava.forward(model.params, cfg, seq[None], jnp.asarray(pixels), spec=spec)["logits"][0], -1))
  rows, tgt = np.asarray(positions) - 1, seq[np.asarray(positions)]
  nl, nh = cfg.text.num_hidden_layers, cfg.text.num_attention_heads
  clean = np.asarray(fwd(_gate(cfg.text)))[rows, tgt]
  abl = np.zeros((len(positions), nl, nh))
  for l in range(nl):
    for h in range(nh):
      abl[:, l, h] = np.asarray(fwd(_gate(cfg.text, l, h)))[rows, tgt]
  return clean, abl


@pytest.mark.parametrize("semantics", ["current_token", "full_sequence"])
def test_vmapped_equals_per_head_loop(tiny_model, case, semantics):
  seq, pixels, positions = case
  clean, abl = head_logprobs(tiny_model.params, tiny_model.config, seq, pixels, positions, semantics=semantics,
                             chunk=3)
  loop = _loop_current_token if semantics == "current_token" else _loop_full_sequence
  ref_clean, ref_abl = loop(tiny_model, seq, pixels, positions)
  assert np.abs(delta_scores(ref_clean, ref_abl)).max() > 1e-3, "ablations must matter for the test to mean much"
  np.testing.assert_allclose(np.exp(clean), np.exp(ref_clean), atol=1e-6)
  np.testing.assert_allclose(np.exp(abl), np.exp(ref_abl), atol=1e-6)


def _hook(layer_module, head, d):
  def zero_head(module, args):
    x = args[0].clone()
    x[..., head * d:(head + 1) * d] = 0
    return (x,)
  return layer_module.self_attn.o_proj.register_forward_pre_hook(zero_head)


def _torch_logprob(logits, target):
  return float(torch.log_softmax(logits[0, -1].double(), -1)[target])


def test_current_token_equals_transformers_cached_hook(tiny_model, tiny_torch, case):
  """The official mechanism: clean past_key_values of the prefix, then the last input token with the hook."""
  seq, pixels, positions = case
  cfg = tiny_model.config.text
  layers = tiny_torch.model.language_model.layers
  ids, pv = torch.as_tensor(seq[None], dtype=torch.long), torch.as_tensor(pixels)
  clean, abl = head_logprobs(tiny_model.params, tiny_model.config, seq, pixels, positions, chunk=3)
  with torch.no_grad():
    for i, p in enumerate(positions):
      past = tiny_torch(input_ids=ids[:, :p - 1], pixel_values=pv, use_cache=True).past_key_values
      step = lambda: tiny_torch(input_ids=ids[:, p - 1:p], past_key_values=copy.deepcopy(past), use_cache=True)
      assert np.exp(clean[i]) == pytest.approx(np.exp(_torch_logprob(step().logits, seq[p])), abs=1e-5)
      for l in range(cfg.num_hidden_layers):
        for h in range(cfg.num_attention_heads):
          handle = _hook(layers[l], h, cfg.head_dim)
          try:
            ref = _torch_logprob(step().logits, seq[p])
          finally:
            handle.remove()
          assert np.exp(abl[i, l, h]) == pytest.approx(np.exp(ref), abs=1e-5), (p, l, h)


def test_full_sequence_equals_transformers_full_reforward_hook(tiny_model, tiny_torch, case):
  seq, pixels, positions = case
  cfg = tiny_model.config.text
  layers = tiny_torch.model.language_model.layers
  ids, pv = torch.as_tensor(seq[None], dtype=torch.long), torch.as_tensor(pixels)
  _, abl = head_logprobs(tiny_model.params, tiny_model.config, seq, pixels, positions, semantics="full_sequence",
                         chunk=3)
  rows, tgt = np.asarray(positions) - 1, seq[np.asarray(positions)]
  with torch.no_grad():
    for l in range(cfg.num_hidden_layers):
      for h in range(cfg.num_attention_heads):
        handle = _hook(layers[l], h, cfg.head_dim)
        try:
          logp = torch.log_softmax(tiny_torch(input_ids=ids, pixel_values=pv).logits[0].double(), -1).numpy()
        finally:
          handle.remove()
        np.testing.assert_allclose(np.exp(abl[:, l, h]), np.exp(logp[rows, tgt]), atol=1e-5)


def test_delta_scores_and_bad_positions(tiny_model, case):
  clean = np.log(np.array([0.5, 0.2]))
  abl = np.log(np.array([0.4, 0.3]))[:, None, None] * np.ones((2, 2, 3))
  np.testing.assert_allclose(delta_scores(clean, abl, "prob")[:, 0, 0], [0.1, -0.1])
  np.testing.assert_allclose(delta_scores(clean, abl, "abs")[:, 1, 2], [0.1, 0.1])
  np.testing.assert_allclose(delta_scores(clean, abl, "logprob")[:, 0, 1], np.log([0.5 / 0.4, 0.2 / 0.3]))
  seq, pixels, _ = case
  with pytest.raises(ValueError, match="positions must lie"):
    head_logprobs(tiny_model.params, tiny_model.config, seq, pixels, [len(seq)])
  with pytest.raises(ValueError, match="semantics"):
    head_logprobs(tiny_model.params, tiny_model.config, seq, pixels, [3], semantics="other")


# ---- which tokens are scored ---------------------------------------------------------------------------------

HAND_CAPTION = 'A "red" Dog sits on a chair, next to a dog.'


def test_word_to_first_sub_token_hand_checked(tiny_model):
  """Tokens (tiny BPE): 7 'D' (8, 9), 18 '▁c' (21, 23), 32 'd' (39, 40); NLTK turns the quotes into `` ''."""
  tok = tiny_model.processor.tokenizer
  sentence = score_caption(1, HAND_CAPTION, {"chair"}, Vocabulary.coco())
  assert sentence["hallucination_idxs"] == [4, 13] and sentence["correct_idxs"] == [8]
  ids, offsets = caption_tokens(tok, HAND_CAPTION)
  assert offsets[7] == (8, 9) and offsets[18] == (21, 23) and offsets[32] == (39, 40)
  got = scored_tokens(sentence, HAND_CAPTION, tok, ids, offsets)
  assert [(t.set, t.word, t.char_span, t.token_index, t.locate) for t in got] == [
      ("H", "dog", (8, 11), 7, "position"), ("N", "chair", (22, 27), 18, "position"),
      ("H", "dog", (39, 42), 32, "position")]
  # Without word indices: the k-th whole-word occurrence of the text.
  no_idx = {k: v for k, v in sentence.items() if k not in ("hallucination_idxs", "correct_idxs")}
  by_text = scored_tokens(no_idx, HAND_CAPTION, tok, ids, offsets)
  assert [(t.token_index, t.locate) for t in by_text] == [(7, "text"), (18, "text"), (32, "text")]
  # The official rule: every token whose text is a mention's first sub-token ('d' of "dog", 'c' of "chair").
  official = scored_tokens(sentence, HAND_CAPTION, tok, ids, offsets, match="token")
  assert {t.token for t in official} <= {"d", "c"}
  assert 32 in [t.token_index for t in official if t.set == "H"]
  assert 18 in [t.token_index for t in official if t.set == "N"]


def test_external_chair_outputs_without_tokens(tiny_model):
  """Rohrbach-style CHAIR entries (singular words, no tokens or indices) and AD-HH's index key still locate every
  mention; a bare word-boundary piece is never the scored token."""
  tok = tiny_model.processor.tokenizer
  caption = "People sit near two dogs and a hot dog."
  full = score_caption(1, caption, {"person"}, Vocabulary.coco(style="rohrbach"))
  assert [w for w, _ in full["mscoco_hallucinated_words"]] == ["dog", "hot dog"]  # singularised, as Rohrbach's
  bare = {k: full[k] for k in ("mscoco_hallucinated_words", "mscoco_non_hallucinated_words")}
  ids, offsets = caption_tokens(tok, caption)
  got = scored_tokens(bare, caption, tok, ids, offsets)
  spans = [(t.set, t.word, caption[t.char_span[0]:t.char_span[1]]) for t in got]
  assert spans == [("N", "person", "People"), ("H", "dog", "dogs"), ("H", "hot dog", "hot dog")]
  assert all(t.token and t.locate == "text" for t in got)
  # A plural and an exact mention of one word: both located, in text order.
  caption = "Dogs and a cat sit at a table with a dog."
  full = score_caption(1, caption, {"cat"}, Vocabulary.coco(style="rohrbach"))
  bare = {k: full[k] for k in ("mscoco_hallucinated_words", "mscoco_non_hallucinated_words")}
  ids, offsets = caption_tokens(tok, caption)
  got = [(t.word, caption[t.char_span[0]:t.char_span[1]]) for t in scored_tokens(bare, caption, tok, ids, offsets)]
  assert [c for w, c in got if w == "dog"] == ["Dogs", "dog"]
  # AD-HH's chair.py names the correct-object indices non_hallucination_idxs.
  adhh = score_caption(1, HAND_CAPTION, {"chair"}, Vocabulary.coco())
  adhh["non_hallucination_idxs"] = adhh.pop("correct_idxs")
  ids, offsets = caption_tokens(tok, HAND_CAPTION)
  located = scored_tokens(adhh, HAND_CAPTION, tok, ids, offsets)
  assert [(t.token_index, t.locate) for t in located] == [(7, "position"), (18, "position"), (32, "position")]


def test_align_words_and_overlap():
  assert align_words('a "b" c', ["a", "``", "b", "''", "c"]) == [(0, 1), (2, 3), (3, 4), (4, 5), (6, 7)]
  assert align_words("a b", ["a", "x", "b"]) == [(0, 1), None, (2, 3)]
  assert first_token_overlapping([(0, 1), (1, 2), (2, 5)], (2, 4)) == 2
  assert first_token_overlapping([(0, 1)], (3, 4)) is None
  assert first_token_overlapping([(0, 1), (0, 3)], (0, 3), skip=lambda i: i == 0) == 1


def test_incremental_offsets_match_tokenizer_offsets(tiny_model):
  tok = tiny_model.processor.tokenizer
  ids, offsets = caption_tokens(tok, HAND_CAPTION)
  text, inc = incremental_offsets(tok, ids)
  assert text == HAND_CAPTION
  for (a, b), (c, d) in zip(offsets, inc):  # the same characters up to where the leading space is counted
    assert HAND_CAPTION[a:b].strip() == HAND_CAPTION[c:d].strip()
