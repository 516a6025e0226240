"""AIR fidelity: distributions kept by the default projection inside the model, and official_compat equal to a
torch reference of the official loop on a left-padded batch (padding rows handled as the official code does)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import air_jax
from models import llava
from models.segments import segment_ids
from tests.conftest import PROMPTS, hf_inputs
from tests.hf_air_reference import air_attention_patch
from tests.tiny import random_images

N = 4
FWD = jax.jit(llava.forward, static_argnames=("config", "output_attentions"))


@pytest.fixture(scope="module")
def batch(tiny_model):
  images = random_images(2, 28, seed=31)
  # position_ids as transformers 4.x (the official code's) generate sets them: padding positions 1, as ours
  inputs = hf_inputs(tiny_model.processor, images, PROMPTS)
  mask = inputs["attention_mask"].numpy()
  assert (mask == 0).any(), "the batch must be left padded for the test to bite"
  seg = np.asarray(segment_ids(jnp.asarray(inputs["input_ids"].numpy()), jnp.asarray(mask),
                               tiny_model.config.image_token_id))
  return images, inputs, seg


# (16, 32) on 2 layers: the projection and QK rescale act in layer 1 only, so layer 0's padding rows (unedited,
# uniform over the written keys) feed layer 1's leak; (5, 18) is covered by test_air_generate's greedy parity.
@pytest.mark.parametrize("layers", [(16, 32)])
def test_official_compat_left_padded_logits_equal_official_reference(tiny_model, tiny_torch, batch, layers):
  """Every step's logits of the official-compat loop equal the official reference's within 1e-5."""
  images, inputs, seg = batch
  cfg = air_jax.AIRConfig.preset("air_star", heads="all", qk_rescale=True, adhh_threshold=0.2, official_compat=True,
                                 projection_layers=layers, qk_layers=layers)
  ours = air_jax.generate(tiny_model, cfg, images, PROMPTS, max_new_tokens=N, bucket=0, output_scores=True)
  text = tiny_model.config.text
  with air_attention_patch(cfg, seg, text.num_hidden_layers, text.num_attention_heads), torch.no_grad():
    ref = tiny_torch.generate(**inputs, max_new_tokens=N, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, min_new_tokens=N)
  ref_logits = torch.stack(ref.logits, 1).numpy()
  np.testing.assert_array_equal(ours.token_ids, ref.sequences[:, inputs["input_ids"].shape[1]:].numpy())
  scale = np.abs(ref_logits).max()
  np.testing.assert_allclose(ours.scores[:, :N], ref_logits, rtol=1e-5, atol=1e-5 * scale)


def test_model_default_rows_stay_distributions(tiny_model, batch):
  """air preset on every row and head (reallocation renormalised + QK rescale + projection): prefill and decoding
  attention rows are distributions over the visible keys in every layer; the official formula is not."""
  images, inputs, _ = batch
  ids, mask = inputs["input_ids"].numpy(), inputs["attention_mask"].numpy()
  pixels = jnp.asarray(inputs["pixel_values"].numpy())
  base = air_jax.AIRConfig.preset("air", heads="all", tau_text=0.05, realloc_rows="all", qk_rows="all",
                                  projection_rows="all", beta=0.3)
  for compat in (False, True):
    cfg = base.replace(official_compat=compat)
    att = np.asarray(FWD(tiny_model.params, tiny_model.config, jnp.asarray(ids), pixels,
                         attention_mask=jnp.asarray(mask), spec=cfg.compile(tiny_model.config),
                         output_attentions=True)["attentions"])  # [L, B, H, T, T]
    real = np.broadcast_to(mask.astype(bool)[None, :, None, :], att.shape[:-1])
    sums = att.sum(-1)[real]
    if compat:
      assert np.abs(sums - 1).max() > 1e-3 or att.min() < 0  # the official projection breaks rows
      continue
    assert att[real].min() >= 0.0
    np.testing.assert_allclose(sums, 1.0, atol=2e-6)
    out = air_jax.generate(tiny_model, cfg, images, PROMPTS, max_new_tokens=N, bucket=0,
                           output_attention_stats=True)
    mass = out.segment_mass[:, :N]  # [B, N, L, H, 3]: the generating row's mass on system / image / text
    assert mass.min() >= 0.0
    np.testing.assert_allclose(mass.sum(-1), 1.0, atol=2e-6)


AIR_READINGS = {
    "default_every_row": dict(qk_rows="all", projection_rows="all", realloc_rows="all"),
    "alternatives": dict(qk_clamp=None, qk_energy="block", projection_rescale="energy", qk_rows="all",
                         projection_rows="all", realloc_rows="all"),
}


@pytest.mark.parametrize("name", list(AIR_READINGS))
def test_air_readings_match_the_reference(tiny_model, tiny_torch, batch, name):
  """The `air` preset's readings of steps (a)-(d), default and alternative, equal the torch reference."""
  _, inputs, seg = batch
  cfg = air_jax.AIRConfig.preset("air", heads="all", tau_text=0.05, **AIR_READINGS[name])
  ids, mask = inputs["input_ids"].numpy(), inputs["attention_mask"].numpy()
  pixels = jnp.asarray(inputs["pixel_values"].numpy())
  run = lambda spec: np.asarray(FWD(tiny_model.params, tiny_model.config, jnp.asarray(ids), pixels,
                                    attention_mask=jnp.asarray(mask), spec=spec)["logits"])
  ours, plain = run(cfg.compile(tiny_model.config)), run(None)
  text = tiny_model.config.text
  with air_attention_patch(cfg, seg, text.num_hidden_layers, text.num_attention_heads), torch.no_grad():
    ref = tiny_torch(**inputs).logits.numpy()
  valid = mask.astype(bool)
  assert np.abs(ours - plain)[valid].max() > 1e-2
  np.testing.assert_allclose(ours[valid], ref[valid], rtol=1e-4, atol=5e-5)


def test_air_reading_options_validate():
  with pytest.raises(ValueError, match="qk_energy"):
    air_jax.AIRConfig.preset("air", heads="all", qk_energy="matrix")
  with pytest.raises(ValueError, match="projection_rescale"):
    air_jax.AIRConfig.preset("air", heads="all", projection_rescale="frobenius")
  cfg = air_jax.AIRConfig.preset("air", heads="all", qk_clamp=None)
  spec = cfg.compile(air_jax.AIRConfig.__module__ and __import__("models.config").config.LlavaConfig())
  assert float(spec.ops.qk_rescale.clamp_hi[0]) == np.inf and spec.ops.qk_rescale.causal_block is None
  assert air_jax.AIRConfig.preset("air", heads="all").qk_clamp == (0.8, 1.25)  # the documented default
