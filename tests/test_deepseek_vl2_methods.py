"""Decoding methods on DeepSeek-VL2: VCD noises the tiles (an example's noise independent of the batch), DoLa reads
the DeepSeek-V2 decoder's early exits (equal to the torch reference's hidden states)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import air_jax
from convert.hf_deepseek_vl2 import load_params
from models import deepseek_v2, deepseek_vl2
from models.family import prompt_pieces
from models.deepseek_vl2_processing import USER_TEMPLATE, batch
from tests.test_deepseek_vl2 import images
from tests.tiny_deepseek_vl2 import make_tiny_deepseek_vl2

PROMPTS = ["Please describe this image in detail.", "What is in the picture?"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tiny_dsvl2_methods"))
  ref, tok = make_tiny_deepseek_vl2(path)
  return path, ref, tok, air_jax.load_pretrained(path)


def test_early_exits_equal_the_reference_hidden_states(tiny):
  path, ref, tok, model = tiny
  cfg = model.config
  params = jax.tree.map(jnp.asarray, load_params(path, cfg))
  ids, mask, tiles, crops = batch(tok, cfg, [USER_TEMPLATE.format(prompt=PROMPTS[0])], [images()[:1]],
                                  tok.pad_token_id)
  with torch.no_grad():
    want = ref(torch.tensor(ids), torch.tensor(mask), torch.tensor(tiles), crops, cfg.image_token_id,
               output_hidden_states=True)
  fam = deepseek_vl2.FAMILY
  vision = {"tiles": jnp.asarray(tiles)[None], "crops": jnp.asarray(crops, jnp.int32)}
  embeds, positions, ctx = prompt_pieces(params, cfg, jnp.asarray(ids), jnp.asarray(mask), vision)
  n = cfg.text.num_hidden_layers
  hidden, _, extras = fam.decoder(params, cfg, embeds, positions, ctx, output_hidden_layers=tuple(range(n + 1)))
  got = np.asarray(extras["hidden_states"])
  for i in range(n):  # transformers' last entry is after the final norm; ours (i = n) before it
    np.testing.assert_allclose(got[i], want.hidden_states[i].numpy(), atol=1e-5, rtol=1e-5)
  # The readout of the last layer's exit through the final norm is the model's own logits.
  exit_last = fam.exit_logits(params, cfg, jnp.asarray(got[n][:, -1])[None], True)[0]
  np.testing.assert_allclose(np.asarray(exit_last), want.logits.numpy()[:, -1], atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="outside"):
    deepseek_v2.decoder(params["language_model"], cfg.text, embeds, positions, ctx, output_hidden_layers=(n + 1,))


@pytest.mark.parametrize("method", ["vcd", "dola"])
def test_methods_run_and_rows_equal_alone(tiny, method):
  """Two images of different tile counts in one batch: each row equals the example run alone."""
  _, _, _, model = tiny
  imgs = images()[:2]
  m = air_jax.methods.make(method)
  both = air_jax.generate(model, m, imgs, PROMPTS, max_new_tokens=4, output_scores=True)
  for i in range(2):
    alone = air_jax.generate(model, m, imgs[i], PROMPTS[i], max_new_tokens=4, output_scores=True)
    np.testing.assert_array_equal(alone.token_ids[0], both.token_ids[i])
    np.testing.assert_allclose(alone.scores[0], both.scores[i], atol=1e-5, rtol=1e-5)


def test_halc_runs_and_rows_equal_alone(tiny, tmp_path):
  """HALC crops DeepSeek-VL2's tiles (global view and local tiles) and shows the detector the global view,
  de-normalised with the official (x - 0.5) / 0.5; a batch equals its rows run alone."""
  from tests.test_halc import StubDetector, greedy_words_synonyms

  model = tiny[3]
  imgs = images()[:2]
  synonyms = greedy_words_synonyms(model, imgs, PROMPTS, 16, tmp_path / "synonyms.txt", min_words=2)
  cfg = air_jax.methods.make("halc", detector=StubDetector(), synonyms=synonyms)
  batch = air_jax.generate(model, cfg, imgs, PROMPTS, max_new_tokens=16)
  for i in range(2):
    alone = air_jax.generate(model, cfg, imgs[i], PROMPTS[i], max_new_tokens=16)
    np.testing.assert_array_equal(alone.token_ids[0], batch.token_ids[i])
  greedy = air_jax.generate(model, None, imgs, PROMPTS, max_new_tokens=16)
  assert not np.array_equal(batch.token_ids, greedy.token_ids)  # some object word was re-decided


def test_a_list_of_one_image_is_that_image(tiny):
  """generate takes a list of images per prompt in every family: [a] is a, an empty list a named error."""
  model = tiny[3]
  img = images()[0]
  as_list = air_jax.generate(model, None, [[img]], PROMPTS[:1], max_new_tokens=3)
  np.testing.assert_array_equal(as_list.token_ids, air_jax.generate(model, None, [img], PROMPTS[:1],
                                                                    max_new_tokens=3).token_ids)
  with pytest.raises(ValueError, match="image 0 is an empty list, but the deepseek_vl2 family needs one image"):
    air_jax.generate(model, None, [[]], PROMPTS[:1], max_new_tokens=3)


@pytest.mark.parametrize("semantics", ["current_token", "full_sequence"])
def test_gradient_screen_equals_finite_difference(tiny, semantics):
  """The generic gradient screen through MLA and the MoE layers (the routing is constant near gate 1)."""
  from air_jax.attribution import Attributor
  from air_jax.attribution_screen import screen_logprobs
  from tests.test_attribution_reuse import finite_difference

  _, _, _, model = tiny
  att = Attributor(model)
  prompt_ids, vision = att.prompt_inputs(images()[1])
  _, ids, _ = att.caption_inputs("A cat sits on a red chair next to a dog.")
  seq = np.concatenate([prompt_ids, ids]).astype(np.int32)
  positions = [len(prompt_ids), len(prompt_ids) + 3, len(seq) - 1]
  _, grad = screen_logprobs(model.params, model.config, seq, vision, positions, semantics=semantics)
  fd = finite_difference(model, seq, vision, positions, semantics, eps=1e-3)
  assert np.abs(fd).max() > 1e-3
  np.testing.assert_allclose(grad, fd, atol=2e-5, rtol=0)


def test_layer_inputs_and_value_norms_match_the_reference(tiny):
  """The analyses' layer inputs and per-head value norms through MLA (values from the normed latent)."""
  from air_jax.analysis import model_io

  path, ref, tok, model = tiny
  cfg = model.config
  ids, mask, tiles, crops = batch(tok, cfg, [USER_TEMPLATE.format(prompt=PROMPTS[0])], [images()[:1]],
                                  tok.pad_token_id)
  vision = {"tiles": jnp.asarray(tiles)[None], "crops": jnp.asarray(crops, jnp.int32)}
  states, norms = model_io.layer_inputs(model, ids, mask, vision)
  with torch.no_grad():
    want = ref(torch.tensor(ids), torch.tensor(mask), torch.tensor(tiles), crops, cfg.image_token_id,
               output_hidden_states=True)
  t = cfg.text
  h, dn, dv, r = t.num_attention_heads, t.qk_nope_head_dim, t.v_head_dim, t.kv_lora_rank
  assert t.use_mla
  for layer, block in enumerate(ref.language.model.layers):
    x = want.hidden_states[layer][0].double()
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + t.rms_norm_eps)
    np.testing.assert_allclose(states[layer, 0], normed.numpy(), atol=1e-4, rtol=1e-4)
    a = block.self_attn
    with torch.no_grad():
      latent = a.kv_a_layernorm(a.kv_a_proj_with_mqa(block.input_layernorm(want.hidden_states[layer][0]))[..., :r])
      v = a.kv_b_proj(latent).reshape(-1, h, dn + dv)[..., dn:]
      wo = a.o_proj.weight.reshape(-1, h, dv)
      out = torch.stack([v[:, head] @ wo[:, head].T for head in range(h)])  # [H, T, E]
    np.testing.assert_allclose(norms[layer, 0], out.norm(dim=-1).numpy(), atol=1e-4, rtol=1e-4)
  with pytest.raises(ValueError, match="use_mla"):
    model_io.qk_factors(model, 0)
