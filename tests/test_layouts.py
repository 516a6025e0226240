"""The two decoder-layer layouts (stacked + scan, per-layer buffers + loop) compute the same thing."""

import jax
import jax.numpy as jnp
import numpy as np

from air_jax import decoding
from models import llava
from models.llama import stack_layers, unstack_layers
from tests.conftest import PROMPTS, hf_inputs
from tests.tiny import random_images


def test_per_layer_layout_equals_stacked(tiny_model):
  inputs = hf_inputs(tiny_model.processor, random_images(2, 28, seed=13), PROMPTS)
  ids, mask = inputs["input_ids"].numpy(), inputs["attention_mask"].numpy()
  pixels = jnp.asarray(inputs["pixel_values"])
  stacked = tiny_model.params
  split = dict(stacked, language_model=unstack_layers(stacked["language_model"]))
  assert isinstance(split["language_model"]["layers"], tuple)
  assert unstack_layers(split["language_model"]) is split["language_model"]  # idempotent
  jax.tree.map(np.testing.assert_array_equal, stack_layers(split["language_model"]), stacked["language_model"])
  a = llava.forward(stacked, tiny_model.config, ids, pixels, attention_mask=mask, output_attentions=True)
  b = llava.forward(split, tiny_model.config, ids, pixels, attention_mask=mask, output_attentions=True)
  np.testing.assert_allclose(a["logits"], b["logits"], atol=1e-5, rtol=1e-5)  # fusion order differs
  np.testing.assert_allclose(a["attentions"], b["attentions"], atol=1e-6)
  sv = decoding.SamplingValues.make(0)
  kw = dict(max_new_tokens=10, output_scores=True, output_stats=True)
  ga = decoding.generate_tokens_jit(stacked, tiny_model.config, ids, mask, pixels, None, sv, **kw)
  gb = decoding.generate_tokens_jit(split, tiny_model.config, ids, mask, pixels, None, sv, **kw)
  np.testing.assert_array_equal(ga["tokens"], gb["tokens"])
  np.testing.assert_allclose(ga["scores"], gb["scores"], atol=1e-5)
  np.testing.assert_allclose(ga["segment_mass"], gb["segment_mass"], atol=1e-6)


def test_read_only_cache_step_equals_writing_step(tiny_model):
  """decode_step(write_cache=False) gives the logits of the writing step and leaves the cache as it was."""
  inputs = hf_inputs(tiny_model.processor, random_images(2, 28, seed=14), PROMPTS)
  ids, mask = jnp.asarray(inputs["input_ids"].numpy()), jnp.asarray(inputs["attention_mask"].numpy())
  pixels = jnp.asarray(inputs["pixel_values"])
  for params in (tiny_model.params,
                 dict(tiny_model.params, language_model=unstack_layers(tiny_model.params["language_model"]))):
    logits, state, _ = decoding.prefill(params, tiny_model.config, ids, mask, pixels, None, ids.shape[1] + 4)
    tok = jnp.argmax(logits, -1).astype(jnp.int32)
    a, new_state, _ = decoding.decode_step(params, tiny_model.config, state, tok, None)
    b, kept, _ = decoding.decode_step(params, tiny_model.config, state, tok, None, write_cache=False)
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    jax.tree.map(np.testing.assert_array_equal, kept.cache, state.cache)
    assert not np.array_equal(jax.tree.leaves(new_state.cache)[0], jax.tree.leaves(state.cache)[0])


def test_cache_view_is_the_same_cache_in_both_layouts(tiny_model):
  """The per-layer cache [B*K, D, S] viewed as [B, K, D, S] holds what the stacked [L, B, S, K, D] holds, the view
  round-trips without a copy of the values, and reordering rows through it agrees across layouts."""
  from air_jax.beam_search import reorder_cache
  from models.family import family_of

  inputs = hf_inputs(tiny_model.processor, random_images(2, 28, seed=15), PROMPTS)
  ids, mask = jnp.asarray(inputs["input_ids"].numpy()), jnp.asarray(inputs["attention_mask"].numpy())
  pixels = jnp.asarray(inputs["pixel_values"])
  config, stacked = tiny_model.config, tiny_model.params
  split = dict(stacked, language_model=unstack_layers(stacked["language_model"]))
  fam = family_of(config)
  _, st, _ = decoding.prefill(stacked, config, ids, mask, pixels, None, ids.shape[1] + 3)
  _, sp, _ = decoding.prefill(split, config, ids, mask, pixels, None, ids.shape[1] + 3)
  view, batch_axes, slot_axes = fam.cache_view(config, sp.cache)
  assert jax.tree.leaves(batch_axes) == [0] * len(jax.tree.leaves(view))
  assert jax.tree.leaves(slot_axes) == [3] * len(jax.tree.leaves(view))
  for li, layer in enumerate(view):
    for name in ("k", "v"):
      np.testing.assert_allclose(layer[name].transpose(0, 3, 1, 2), st.cache[name][li], atol=1e-5)
  jax.tree.map(np.testing.assert_array_equal, fam.cache_from_view(config, view), sp.cache)
  rows = jnp.asarray([1, 1, 0])
  a, b = reorder_cache(config, st.cache, rows), reorder_cache(config, sp.cache, rows)
  for li, layer in enumerate(fam.cache_view(config, b)[0]):
    np.testing.assert_allclose(layer["k"].transpose(0, 3, 1, 2), a["k"][li], atol=1e-5)


def test_per_layer_scan_equals_per_layer_loop(tiny_model, monkeypatch):
  """Per-layer params run long chunks as a scan (one compiled layer) and short ones as a loop: same results, with
  AIR edits, attention maps, statistics and the cache the chunk writes."""
  from air_jax.air_config import AIRConfig
  from models import llama

  inputs = hf_inputs(tiny_model.processor, random_images(2, 28, seed=16), PROMPTS)
  ids, mask = jnp.asarray(inputs["input_ids"].numpy()), jnp.asarray(inputs["attention_mask"].numpy())
  pixels = jnp.asarray(inputs["pixel_values"])
  config = tiny_model.config
  split = dict(tiny_model.params, language_model=unstack_layers(tiny_model.params["language_model"]))
  d = config.dims
  spec = AIRConfig.preset("air", heads=[[l, h] for l in range(d.num_hidden_layers)
                                        for h in range(0, d.num_attention_heads, 2)]).compile(config)
  sv = decoding.SamplingValues.make(0)
  runs = []
  for threshold in (1, 10**9):  # every chunk scanned / none
    monkeypatch.setattr(llama, "SCAN_MIN_TOKENS", threshold)
    jax.clear_caches()
    fwd = llava.forward(split, config, ids, pixels, attention_mask=mask, spec=spec, output_attentions=True)
    _, state, _ = decoding.prefill(split, config, ids, mask, pixels, spec, ids.shape[1] + 4)
    gen = decoding.generate_tokens_jit(split, config, ids, mask, pixels, spec, sv, max_new_tokens=6,
                                       output_scores=True, output_stats=True)
    runs.append((fwd, state.cache, gen))
  (fa, ca, ga), (fb, cb, gb) = runs
  np.testing.assert_allclose(fa["logits"], fb["logits"], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(fa["attentions"], fb["attentions"], atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), ca, cb)
  np.testing.assert_array_equal(ga["tokens"], gb["tokens"])
  np.testing.assert_allclose(ga["scores"], gb["scores"], atol=1e-5)
  np.testing.assert_allclose(ga["segment_mass"], gb["segment_mass"], atol=1e-6)
  jax.clear_caches()
