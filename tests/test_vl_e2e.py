"""Qwen2.5-VL and InternVL behind the family interface, end to end on tiny checkpoints: load_pretrained (images-only
processor), KV-cached generate equal to transformers' generate (a prompt with two images, left padding, buckets),
key segments, AIR with attention statistics, head attribution (both semantics agree on the clean pass), eval.chair.
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import air_jax
from air_jax.attribution import Attributor
from air_jax.generate import eos_token_ids
from eval.chair_metric import Vocabulary, score_caption
from models import family
from models.segments import IMAGE, PAD, SYSTEM, TEXT
from tests.tiny_vl import chat, make_tiny_internvl, make_tiny_qwen2_5_vl, random_image
from tests.vl_reference import assert_layer_reads, eager

COCO = os.path.join(os.path.dirname(__file__), "fixtures", "coco")
PROMPTS = ["Please describe this image in detail.", "What is in the picture?"]
BUILDERS = {"qwen2_5_vl": make_tiny_qwen2_5_vl, "internvl": make_tiny_internvl}
SIZES = {"qwen2_5_vl": [(48, 80), (64, 64), (40, 56)], "internvl": [(64, 32), (32, 32), (90, 30)]}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def tiny(request, tmp_path_factory):
  name = request.param
  path = str(tmp_path_factory.mktemp(name))
  model, hf_proc = BUILDERS[name](path)
  images = [random_image(w, h, i + 1) for i, (w, h) in enumerate(SIZES[name])]
  return dict(name=name, path=path, torch=eager(model), hf_proc=hf_proc, images=images,
              model=air_jax.load_pretrained(path))


def test_load_pretrained_picks_the_family(tiny):
  model = tiny["model"]
  assert model.family.name == tiny["name"]
  assert model.num_params() == sum(p.numel() for p in tiny["torch"].parameters())
  assert type(model.processor).__name__ != "ProcessorMixin"  # ours: no video processor needed


def test_generate_equals_transformers_generate(tiny):
  model, hf_proc = tiny["model"], tiny["hf_proc"]
  images = [[tiny["images"][0], tiny["images"][1]], tiny["images"][2]]
  out = air_jax.generate(model, None, images, PROMPTS, max_new_tokens=24, bucket=32)
  assert out.prompt_mask.shape[1] % 32 == 0 and not out.prompt_mask[:, 0].all()
  hf_proc.tokenizer.padding_side = "left"
  inputs = hf_proc(images=tiny["images"], text=[chat(hf_proc, PROMPTS[0], 2), chat(hf_proc, PROMPTS[1], 1)],
                   return_tensors="pt", padding=True)
  eos = list(eos_token_ids(model.config, model.processor.tokenizer))
  with torch.no_grad():
    ref = tiny["torch"].generate(**inputs, max_new_tokens=24, do_sample=False, eos_token_id=eos,
                                 pad_token_id=model.processor.tokenizer.pad_token_id)
  ref = ref[:, inputs["input_ids"].shape[1]:].numpy()
  for b in range(2):
    n = int(out.num_tokens[b])
    assert n >= 1
    np.testing.assert_array_equal(out.token_ids[b, :n], ref[b, :n])
    # the real prompt is the transformers prompt, only padded further on the left
    real = out.prompt_ids[b][out.prompt_mask[b].astype(bool)]
    np.testing.assert_array_equal(real, inputs["input_ids"][b][inputs["attention_mask"][b].bool()].numpy())


def test_text_only_prompts_equal_transformers_generate(tiny):
  """Prompts without an image ([] per prompt), alone or in a batch with no image at all, as transformers; the same
  row inside a batch with images is unchanged."""
  model, hf_proc = tiny["model"], tiny["hf_proc"]
  alone = air_jax.generate(model, None, [[], []], PROMPTS, max_new_tokens=12, bucket=32)
  hf_proc.tokenizer.padding_side = "left"
  inputs = hf_proc(text=[chat(hf_proc, p, 0) for p in PROMPTS], return_tensors="pt", padding=True)
  eos = list(eos_token_ids(model.config, model.processor.tokenizer))
  with torch.no_grad():
    ref = tiny["torch"].generate(**inputs, max_new_tokens=12, do_sample=False, eos_token_id=eos,
                                 pad_token_id=model.processor.tokenizer.pad_token_id)
  ref = ref[:, inputs["input_ids"].shape[1]:].numpy()
  mixed = air_jax.generate(model, None, [[], tiny["images"][2]], PROMPTS, max_new_tokens=12, bucket=32)
  for b in range(2):
    n = int(alone.num_tokens[b])
    np.testing.assert_array_equal(alone.token_ids[b, :n], ref[b, :n])
  np.testing.assert_array_equal(mixed.token_ids[0], alone.token_ids[0])


def test_text_only_view_drops_the_image_frame(tiny):
  """PAI's text-only view drops each image run with its start / end frame (Qwen's vision_start / vision_end,
  InternVL's <img> / </img>): what is left is the prompt's text."""
  from air_jax.methods.base import ViewInputs, text_only_positions, without_image_tokens

  model = tiny["model"]
  tok = model.processor.tokenizer
  frame = {"qwen2_5_vl": ("<|vision_start|>", "<|vision_end|>"), "internvl": ("<img>", "</img>")}[tiny["name"]]
  frame_ids = tok.convert_tokens_to_ids(list(frame))
  ids, mask, _ = air_jax.generate_inputs(model, [[tiny["images"][0], tiny["images"][1]], tiny["images"][2]],
                                         PROMPTS, bucket=32)
  inputs = ViewInputs(input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask), pixel_values=None)
  view = without_image_tokens(inputs, is_image=text_only_positions(inputs, model.config))
  for b in range(2):
    real = ids[b][mask[b] == 1]
    want = [t for t in real.tolist() if t != model.config.image_token_id and t not in frame_ids]
    assert len(want) == len(real) - (real == model.config.image_token_id).sum() - 2 * (2 - b)  # 2 images, then 1
    got = np.asarray(view.input_ids[b])[np.asarray(view.attention_mask[b]) == 1]
    assert got.tolist() == want


def test_segments_follow_the_image_tokens(tiny):
  model = tiny["model"]
  cfg = model.config
  ids, mask, vision = air_jax.generate_inputs(model, [[tiny["images"][0], tiny["images"][1]]], PROMPTS[:1])
  seg = np.asarray(family.family_of(cfg).segments(cfg, jnp.asarray(ids), jnp.asarray(mask)))[0]
  ids, mask = ids[0], mask[0].astype(bool)
  is_img = (ids == cfg.image_token_id) & mask
  first = int(np.argmax(is_img))
  np.testing.assert_array_equal(seg == IMAGE, is_img)
  np.testing.assert_array_equal(seg == PAD, ~mask)
  assert (seg[mask][: first - int((~mask).sum())] == SYSTEM).all()
  assert (seg[first:][~is_img[first:]] == TEXT).all()
  starts = is_img & ~np.concatenate([[False], is_img[:-1]])
  assert starts.sum() >= 2  # two images, two runs (Qwen: one per image; InternVL: one per image, tiles inside)


def test_air_and_attention_stats_end_to_end(tiny):
  model = tiny["model"]
  cfg = air_jax.AIRConfig.preset("air", heads=[(0, 1), (1, 2), (1, 3)])
  images = [[tiny["images"][0], tiny["images"][1]], tiny["images"][2]]
  out = air_jax.generate(model, cfg, images, PROMPTS, max_new_tokens=4, output_attention_stats=True)
  d = model.config.dims
  assert out.segment_mass.shape == (2, 4, d.num_hidden_layers, d.num_attention_heads, 3)
  mass = out.segment_mass[:, 0]
  assert np.all(mass[..., 1] > 0)  # the image receives attention in every head
  untouched = np.ones((d.num_hidden_layers, d.num_attention_heads), bool)
  untouched[0, 1] = untouched[1, 2] = untouched[1, 3] = False
  np.testing.assert_allclose(mass.sum(-1)[:, untouched], 1.0, atol=1e-5)  # heads AIR leaves alone


def test_head_attribution_end_to_end(tiny):
  model = tiny["model"]
  caption = "A cat sits on a red chair next to a dog."
  sentence = score_caption(1, caption, {"chair"}, Vocabulary.coco())
  results = {s: Attributor(model, semantics=s).attribute(tiny["images"][0], sentence)
             for s in ("current_token", "full_sequence")}
  d = model.config.dims
  r = results["current_token"]
  assert r.scored and r.ablated_logprob.shape == (len(r.scored), d.num_hidden_layers, d.num_attention_heads)
  assert np.isfinite(r.ablated_logprob).all()
  # The clean pass: one decoding step (current_token) vs a full forward (full_sequence); equal only if the
  # decoding step has the token's RoPE position (multimodal for Qwen2.5-VL).
  np.testing.assert_allclose(results["current_token"].clean_logprob, results["full_sequence"].clean_logprob,
                             atol=2e-5)


@pytest.mark.parametrize("semantics", ["current_token", "full_sequence"])
def test_prefix_reuse_equals_plain(tiny, semantics):
  """Clean-run reuse (layer by layer: Qwen2 biases / Qwen3 q/k norms, multimodal RoPE) equals the plain rerun."""
  from air_jax.attribution_core import head_logprobs

  model = tiny["model"]
  assert model.family.supports_layer_reuse(model.config)
  att = Attributor(model)
  prompt_ids, pixels = att.prompt_inputs(tiny["images"][0])
  _, ids, _ = att.caption_inputs("A cat sits on a red chair next to a dog.")
  seq = np.concatenate([prompt_ids, ids]).astype(np.int32)
  positions = [len(prompt_ids), len(prompt_ids) + 4, len(seq) - 1]
  kw = dict(semantics=semantics, chunk=8)
  ref_clean, ref_abl = head_logprobs(model.params, model.config, seq, pixels, positions, reuse=False, **kw)
  assert np.abs(ref_abl - ref_clean[:, None, None]).max() > 1e-3, "ablations must matter"
  clean, abl = head_logprobs(model.params, model.config, seq, pixels, positions, **kw)
  np.testing.assert_allclose(clean, ref_clean, atol=1e-5, rtol=0)
  np.testing.assert_allclose(abl, ref_abl, atol=1e-5, rtol=0)


@pytest.mark.parametrize("semantics", ["current_token", "full_sequence"])
def test_gradient_screen_equals_finite_difference(tiny, semantics):
  """The generic screen (multimodal RoPE for Qwen2.5-VL: the decoding row needs the token's text position)."""
  from air_jax.attribution_core import head_logprobs
  from air_jax.attribution_screen import screen_logprobs
  from tests.test_attribution_reuse import finite_difference

  model = tiny["model"]
  att = Attributor(model)
  prompt_ids, pixels = att.prompt_inputs(tiny["images"][0])
  _, ids, _ = att.caption_inputs("A cat sits on a red chair next to a dog.")
  seq = np.concatenate([prompt_ids, ids]).astype(np.int32)
  positions = [len(prompt_ids), len(prompt_ids) + 4, len(seq) - 1]
  clean, grad = screen_logprobs(model.params, model.config, seq, pixels, positions, semantics=semantics)
  fd = finite_difference(model, seq, pixels, positions, semantics)
  assert np.abs(fd).max() > 1e-3
  np.testing.assert_allclose(grad, fd, atol=2e-5, rtol=0)
  ref_clean, _ = head_logprobs(model.params, model.config, seq, pixels, positions, semantics=semantics, heads=[])
  np.testing.assert_allclose(clean, ref_clean, atol=1e-5, rtol=0)


def test_layer_inputs_and_value_norms_match_transformers(tiny):
  """The analyses' layer inputs (the residual stream, multimodal RoPE positions for Qwen2.5-VL) and value norms."""
  from air_jax.analysis import model_io

  model, hf_proc = tiny["model"], tiny["hf_proc"]
  inputs = hf_proc(images=tiny["images"][:1], text=[chat(hf_proc, PROMPTS[0], 1)], return_tensors="pt")
  ids, _, vision = air_jax.generate_inputs(model, tiny["images"][:1], PROMPTS[:1], bucket=0)
  np.testing.assert_array_equal(ids, inputs["input_ids"].numpy())
  states, norms = model_io.layer_inputs(model, ids, None, vision)
  with torch.no_grad():
    ref = tiny["torch"](**inputs, output_hidden_states=True)
  lm = tiny["torch"].model.language_model
  assert_layer_reads(states, norms, ref.hidden_states, lm, lm.config)
  # Qwen2's q/k biases and Qwen3's q/k norms make the scores non-bilinear: W_QK is refused by name.
  with pytest.raises(ValueError, match="qkv_bias|qk_norm"):
    model_io.qk_factors(model, 0)


def test_analyze_cli_end_to_end(tiny, tmp_path, capsys):
  """eval.analyze runs every section it can on the family; B.1 (W_QK) is skipped by name (q/k biases / norms)."""
  from eval.analyze import main

  argv = ["--model", tiny["path"], "--coco-root", COCO, "--num-images", "2", "--max-new-tokens", "6", "--no-sweeps",
          "--out", str(tmp_path)]
  assert main(argv) == 0
  result = json.loads((tmp_path / "analysis.json").read_text())
  assert {"similarity", "variance", "tai", "mai"} <= set(result)
  assert "bilinear" in result["propagation"]["skipped"]
  assert "B.1 (propagation) skipped" in capsys.readouterr().err


def test_chair_cli_end_to_end(tiny, tmp_path, capsys):
  from eval.chair import main

  argv = ["--coco-root", COCO, "--model", tiny["path"], "--num-images", "3", "--max-new-tokens", "5",
          "--batch-size", "2", "--backend", "cpu", "--out", str(tmp_path), "--no-progress"]
  assert main(argv) == 0
  assert "greedy" in capsys.readouterr().out
  result = json.loads((tmp_path / "greedy_chair.json").read_text())
  assert len(result["sentences"]) + len(result["skipped"]) == 3


def test_bad_inputs_are_clear_errors(tiny):
  model = tiny["model"]
  with pytest.raises(ValueError, match="placeholders but 1 images"):
    model.processor(images=[tiny["images"][0]], text=["no image placeholder here"])
  with pytest.raises(ValueError, match="video inputs are not supported"):
    model.processor(text=["x"], videos=[np.zeros((2, 8, 8, 3), np.uint8)])
  proc = model.processor

  class DropsOneImageToken:  # a processor whose prompt lost one image token
    tokenizer, chat_template, apply_chat_template = proc.tokenizer, proc.chat_template, proc.apply_chat_template

    def __call__(self, **kw):
      out = proc(**kw)
      ids = out["input_ids"]
      row, col = np.argwhere(ids == model.config.image_token_id)[0]
      ids[row, col] = 5
      return out

  with pytest.raises(ValueError, match="image tokens"):
    model.family.prepare_inputs(DropsOneImageToken(), model.config, [tiny["images"][2]], PROMPTS[1:], 0)


@pytest.mark.parametrize("method", ["vcd", "pai", "dola"])
def test_baseline_methods_run(tiny, method):
  """The registered baselines run unchanged on these families (VCD noises the family's pixel arrays, PAI uses its
  segments, DoLa its early-exit readout); their faithfulness is tested on LLaVA (tests/test_methods.py)."""
  model = tiny["model"]
  out = air_jax.generate(model, air_jax.methods.make(method), [[tiny["images"][0], tiny["images"][1]]],
                         PROMPTS[:1], max_new_tokens=2)
  assert out.token_ids.shape == (1, 2) and (out.token_ids < model.config.dims.vocab_size).all()


def test_vcd_noise_is_per_example_and_keeps_still_frames(tiny):
  """VCD's noised view: an example's noise does not depend on the rest of the batch (images of other sizes give
  other patch / tile counts), and Qwen's two identical time frames of a still image stay identical."""
  from air_jax.methods.vcd import noise_field

  import jax

  model, imgs = tiny["model"], tiny["images"][:2]
  vcd = air_jax.methods.make("vcd")
  both = air_jax.generate(model, vcd, imgs, PROMPTS, max_new_tokens=4, output_scores=True)
  for i in range(2):
    alone = air_jax.generate(model, vcd, imgs[i], PROMPTS[i], max_new_tokens=4, output_scores=True)
    np.testing.assert_array_equal(alone.token_ids[0], both.token_ids[i])
    np.testing.assert_allclose(alone.scores[0], both.scores[i], atol=1e-5, rtol=1e-5)
  vision = model.family.prepare_inputs(model.processor, model.config, imgs, PROMPTS, 0)["vision"]
  add_noise = lambda pix: pix + noise_field(jax.random.key(0), pix.shape[1:])
  noised = model.family.map_pixels(model.config, vision, add_noise)
  if tiny["name"] == "qwen2_5_vl":
    v = model.config.vision
    pix = np.asarray(noised["pixels"])
    frames = pix.reshape(pix.shape[:2] + (v.in_channels, v.temporal_patch_size, -1))
    np.testing.assert_array_equal(frames[:, :, :, 0], frames[:, :, :, 1])
    assert np.abs(pix - np.asarray(vision["pixels"])).min() > 0  # every patch is noised
    rows = np.abs(pix - np.asarray(vision["pixels"]))[0].reshape(pix.shape[1], -1)
    assert not np.allclose(rows[0], rows[1])  # patches get their own noise, not one repeated patch


def test_official_protocol_names_its_family(tiny, tmp_path, capsys):
  """The official-air protocol re-creates LLaVA-1.5's official script: other families get a clear error."""
  with pytest.raises(ValueError, match=f"protocol 'official-air' re-creates .* llava .* '{tiny['name']}' family"):
    air_jax.generate(tiny["model"], None, tiny["images"][0], PROMPTS[0], max_new_tokens=2, protocol="official-air")
  from eval.chair import main

  argv = ["--coco-root", COCO, "--model", tiny["path"], "--num-images", "2", "--max-new-tokens", "2",
          "--backend", "cpu", "--out", str(tmp_path), "--no-progress", "--protocol", "official-air"]
  assert main(argv) != 0
  assert "protocol 'official-air'" in capsys.readouterr().err
