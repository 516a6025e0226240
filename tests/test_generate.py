"""KV-cached generation: parity with transformers generate, cache vs re-forward, sampling, EOS, compilations."""

import dataclasses
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import air_jax
from air_jax import decoding
from air_jax.backend import BackendError, select_devices
from models import llava
from models.segments import NAMES, segment_ids
from tests.conftest import PROMPTS, hf_inputs
from tests.tiny import make_tiny_llava, random_images

N = 32
LONG = "Please describe this image in detail. What is in the picture? There are two apples."


def _hf_generate(model, processor, images, prompts, n=N, **kw):
  inputs = hf_inputs(processor, images, prompts)
  inputs.pop("position_ids")
  with torch.no_grad():
    out = model.generate(**inputs, max_new_tokens=n, do_sample=False, **kw)
  return out[:, inputs["input_ids"].shape[1]:].numpy()


def test_greedy_matches_transformers_batch_and_single(tiny_model, tiny_torch):
  images = random_images(3, 28, seed=5)
  prompts = [PROMPTS[0], PROMPTS[1], LONG]
  ours = air_jax.generate(tiny_model, None, images, prompts, max_new_tokens=N)
  ref = _hf_generate(tiny_torch, tiny_model.processor, images, prompts)
  np.testing.assert_array_equal(ours.token_ids, ref)
  for i in range(3):  # each row equals that prompt run alone
    alone = air_jax.generate(tiny_model, None, images[i], prompts[i], max_new_tokens=N)
    np.testing.assert_array_equal(alone.token_ids[0], ours.token_ids[i])
    assert alone.text == ours.texts[i]


def test_greedy_matches_transformers_mha_tied(tmp_path):
  model, processor = make_tiny_llava(str(tmp_path), kv_heads=4, tie_word_embeddings=True, text_layers=3,
                                     vision_feature_layer=-1, select_strategy="full")
  model.config._attn_implementation = "eager"
  ours = air_jax.load_pretrained(str(tmp_path))
  images = random_images(2, 28, seed=6)
  out = air_jax.generate(ours, None, images, PROMPTS, max_new_tokens=N)
  np.testing.assert_array_equal(out.token_ids, _hf_generate(model, processor, images, PROMPTS))


def test_dynamic_rope_generates_past_max_positions_as_transformers(tmp_path):
  """Dynamic NTK scaling exists to run past max_position_embeddings: no refusal, and the same tokens (the cached
  keys keep the frequencies of the step that wrote them, as in transformers)."""
  model, processor = make_tiny_llava(str(tmp_path), max_positions=40,
                                     rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4})
  model.config._attn_implementation = "eager"
  ours = air_jax.load_pretrained(str(tmp_path))
  images = random_images(2, 28, seed=2)
  out = air_jax.generate(ours, None, images, PROMPTS, max_new_tokens=N)
  assert int(out.prompt_mask.sum(-1).max()) + N > 40 + 32  # well past the trained positions
  np.testing.assert_array_equal(out.token_ids, _hf_generate(model, processor, images, PROMPTS, min_new_tokens=N))


def test_cached_logits_equal_full_reforward(tiny_model):
  images = random_images(2, 28, seed=7)
  out = air_jax.generate(tiny_model, None, images, PROMPTS, max_new_tokens=12, output_scores=True)
  ids = np.concatenate([out.prompt_ids, out.token_ids], axis=1)
  mask = np.concatenate([out.prompt_mask, np.ones_like(out.token_ids)], axis=1)
  _, _, pixels = air_jax.generate_inputs(tiny_model, images, PROMPTS)
  full = np.asarray(llava.forward(tiny_model.params, tiny_model.config, ids, jnp.asarray(pixels),
                                  attention_mask=mask)["logits"])
  t = out.prompt_ids.shape[1]
  # Step i's logits come from the row just before generated token i.
  np.testing.assert_allclose(out.scores, full[:, t - 1: t - 1 + 12], atol=2e-5, rtol=1e-5)


def test_attention_stats_match_full_attention(tiny_model):
  images = random_images(1, 28, seed=8)
  out = air_jax.generate(tiny_model, None, images, PROMPTS[0], max_new_tokens=6, output_attention_stats=True)
  mass = out.segment_mass[0]  # [N, L, H, 3]
  np.testing.assert_allclose(mass.sum(-1), 1.0, atol=1e-5)
  ids = np.concatenate([out.prompt_ids, out.token_ids], axis=1)
  mask = np.concatenate([out.prompt_mask, np.ones_like(out.token_ids)], axis=1)
  _, _, pixels = air_jax.generate_inputs(tiny_model, images, [PROMPTS[0]])
  att = np.asarray(llava.forward(tiny_model.params, tiny_model.config, ids, jnp.asarray(pixels),
                                 attention_mask=mask, output_attentions=True)["attentions"])
  seg = np.asarray(segment_ids(jnp.asarray(ids), jnp.asarray(mask), tiny_model.config.image_token_id))[0]
  t = out.prompt_ids.shape[1]
  for i in range(6):
    row = att[:, 0, :, t - 1 + i, :]  # [L, H, S]
    want = np.stack([row[..., seg == s].sum(-1) for s in range(len(NAMES))], -1)
    np.testing.assert_allclose(mass[i], want, atol=1e-5)


def test_eos_stops_rows_independently(tiny_model, tiny_torch):
  images = random_images(2, 28, seed=5)
  first = air_jax.generate(tiny_model, None, images, PROMPTS, max_new_tokens=N)
  eos = int(first.token_ids[0, 4])  # a token row 0 emits early: make it the EOS
  assert eos not in first.token_ids[1, :3]
  cfg = dataclasses.replace(tiny_model.config, text=dataclasses.replace(tiny_model.config.text, eos_token_id=(eos,)))
  model = dataclasses.replace(tiny_model, config=cfg)
  tok = tiny_model.processor.tokenizer
  old = tok.eos_token_id
  tok.eos_token_id = eos
  try:
    out = air_jax.generate(model, None, images, PROMPTS, max_new_tokens=N)
  finally:
    tok.eos_token_id = old
  stop = int(np.argmax(first.token_ids[0] == eos))
  assert out.num_tokens[0] == stop + 1
  np.testing.assert_array_equal(out.token_ids[0, : stop + 1], first.token_ids[0, : stop + 1])
  assert (out.token_ids[0, stop + 1:] == tok.pad_token_id).all()
  ref = _hf_generate(tiny_torch, tiny_model.processor, images, PROMPTS, eos_token_id=eos,
                     pad_token_id=tok.pad_token_id)
  np.testing.assert_array_equal(out.token_ids[:, : ref.shape[1]], ref)


def test_sampling_is_reproducible_for_a_key(tiny_model):
  images = random_images(2, 28, seed=9)
  kw = dict(max_new_tokens=10, do_sample=True, temperature=1.3, top_k=20, top_p=0.9)
  a = air_jax.generate(tiny_model, None, images, PROMPTS, seed=jax.random.key(1), **kw)
  b = air_jax.generate(tiny_model, None, images, PROMPTS, seed=jax.random.key(1), **kw)
  c = air_jax.generate(tiny_model, None, images, PROMPTS, seed=jax.random.key(2), **kw)
  np.testing.assert_array_equal(a.token_ids, b.token_ids)
  assert (a.token_ids != c.token_ids).any()
  g = air_jax.generate(tiny_model, None, images, PROMPTS, max_new_tokens=10)
  assert (a.token_ids != g.token_ids).any()


def test_sampling_filters():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.key(0), 400)
  draw = lambda k, p: jax.vmap(lambda kk: decoding.sample_token(logits, decoding.Sampling(False), kk, 1.0, k, p))(keys)
  assert set(np.unique(draw(2, 1.0))) == {0, 1}      # top-k keeps the two largest
  assert set(np.unique(draw(0, 0.7))) == {0, 1}      # 0.5 + 0.3 >= 0.7
  assert set(np.unique(draw(0, 0.5))) == {0}         # the top token alone reaches 0.5
  assert set(np.unique(draw(0, 1.0))) == {0, 1, 2, 3}


def test_debug_loop_equals_while_loop(tiny_model):
  images = random_images(2, 28, seed=10)
  a = air_jax.generate(tiny_model, None, images, PROMPTS, max_new_tokens=8, output_scores=True,
                       output_attention_stats=True)
  b = air_jax.generate(tiny_model, None, images, PROMPTS, max_new_tokens=8, output_scores=True,
                       output_attention_stats=True, debug=True)
  np.testing.assert_array_equal(a.token_ids, b.token_ids)
  np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)
  np.testing.assert_allclose(a.segment_mass, b.segment_mass, atol=1e-6)


def test_prompt_lengths_are_bucketed_no_recompile(tiny_model):
  images = random_images(1, 28, seed=11)
  air_jax.generate(tiny_model, None, images, "What?", max_new_tokens=5)
  before = decoding.TRACE_COUNT["generate"]
  for p in ["What is in the picture?", "Please describe this image in detail.", "Hi"]:
    air_jax.generate(tiny_model, None, images, p, max_new_tokens=5)
  assert decoding.TRACE_COUNT["generate"] == before


def test_missing_backend_is_a_clear_error():
  with pytest.raises(BackendError, match=r"'tpu' was requested but JAX found no tpu device; devices found: cpu:0"):
    select_devices("tpu")
  with pytest.raises(ValueError, match="not one of"):
    select_devices("quantum")


def test_sharded_generation_equals_single_device(tiny_dir):
  code = textwrap.dedent(f"""
      import os, sys
      sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})
      import jax, numpy as np, air_jax
      from tests.tiny import random_images
      assert len(jax.devices()) == 8, jax.devices()
      m = air_jax.load_pretrained({tiny_dir!r})
      images = random_images(5, 28, seed=12)
      prompts = ["Please describe this image in detail.", "What is in the picture?"] * 2 + ["Hi"]
      sharded = air_jax.generate(m, None, images, prompts, max_new_tokens=8, output_scores=True)
      one = air_jax.generate(m, None, images, prompts, max_new_tokens=8, output_scores=True,
                             devices=jax.devices()[:1])
      np.testing.assert_array_equal(sharded.token_ids, one.token_ids)
      np.testing.assert_allclose(sharded.scores, one.scores, atol=1e-5)
      print("OK", sharded.token_ids.shape)
  """)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
  assert res.returncode == 0 and "OK (5, 8)" in res.stdout, res.stderr[-3000:]


def test_warp_logits_equals_transformers_warpers():
  """Temperature -> top-k -> top-p as transformers' warpers: the kept set and the distribution sampled from."""
  from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                      TopPLogitsWarper)

  rng = np.random.default_rng(0)
  peaked = rng.standard_normal((3, 32000)).astype(np.float32) * 6.0
  # bfloat16-valued logits (what a bfloat16 LM head gives): many ties, also at the top-p cut-off.
  bf16 = np.asarray(jnp.asarray(rng.standard_normal((3, 32000)) * 3.0, jnp.bfloat16), np.float32)
  tied = np.array([[2.0, 2.0, 2.0, 0.0, -1.0, -1.0, -3.0]], np.float32)  # three tied top tokens
  cases = [(peaked, 1.0, 0, 1.0), (peaked, 0.3, 0, 1.0), (peaked, 1.0, 0, 0.9999), (peaked, 0.7, 50, 0.9),
           (bf16, 1.0, 0, 0.9), (bf16, 1.3, 20, 0.5), (tied, 1.0, 0, 0.2), (tied, 1.0, 0, 0.5),
           (tied, 2.0, 2, 0.9), (peaked, 1.0, 40000, 0.0)]
  for logits, temp, k, p in cases:
    theirs = torch.from_numpy(logits.copy())
    warpers = [TemperatureLogitsWarper(temp)] + ([TopKLogitsWarper(k)] if k > 0 else []) + \
        ([TopPLogitsWarper(p)] if p < 1.0 else [])
    for w in warpers:
      theirs = w(None, theirs)
    ours = np.asarray(decoding.warp_logits(jnp.asarray(logits), jnp.float32(temp), jnp.int32(k), jnp.float32(p)))
    theirs = theirs.numpy()
    # Which of the tokens tied at the top-p cut-off survive follows torch's sort, whose order among ties is
    # arbitrary; ours keeps index order (a stable sort). The number kept is the same; the kept set equals
    # transformers' formula run on a stable sort.
    np.testing.assert_array_equal(np.isfinite(ours).sum(-1), np.isfinite(theirs).sum(-1), err_msg=f"{temp} {k} {p}")
    if p < 1.0:
      x = torch.from_numpy(logits.copy()) / temp
      if k > 0:
        x = TopKLogitsWarper(k)(None, x)
      asc, order = torch.sort(x, stable=True)
      drop = torch.softmax(asc, -1).cumsum(-1) <= 1 - p
      drop[..., -1] = False
      theirs = x.masked_fill(drop.scatter(1, order, drop), -float("inf")).numpy()
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(theirs), err_msg=f"{temp} {k} {p}")
    np.testing.assert_allclose(np.asarray(jax.nn.softmax(ours, axis=-1)),
                               torch.softmax(torch.from_numpy(theirs), -1).numpy(), atol=1e-6, rtol=1e-5)
  # top_p = 1 is off: every token keeps its mass (summing from the top would reach 1.0 before the tail).
  small = rng.standard_normal((1, 97)).astype(np.float32) / 0.3
  assert np.all(np.isfinite(np.asarray(decoding.warp_logits(jnp.asarray(small), 1.0, 0, 1.0))))
