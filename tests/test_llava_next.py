"""LLaVA-NeXT parity with transformers' LlavaNextForConditionalGeneration (eager), Llama and Mistral decoders.

Tiny anyres model: 32 px tiles of 8 px patches (16 features per tile), pinpoints up to 3 tiles wide, images of
several sizes and aspect ratios in one left-padded batch; Mistral with a sliding window shorter than the prompt.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import air_jax
from models import family, llava, llava_next
from models.segments import IMAGE, PAD, SYSTEM, TEXT
from tests.conftest import chat_texts
from tests.tiny import make_tiny_llava_next, random_images_sized

SIZES = [(40, 100), (90, 30), (64, 64)]  # wide, tall, square: different grids and unpadding
PROMPTS = ["Please describe this image in detail.", "What is in the picture?", "Hi"]
DECODERS = {"llama": dict(decoder="llama"), "mistral": dict(decoder="mistral", kv_heads=1, sliding_window=24)}


@pytest.fixture(scope="module", params=sorted(DECODERS))
def tiny_next(request, tmp_path_factory):
  path = str(tmp_path_factory.mktemp(f"tiny_next_{request.param}"))
  model, processor = make_tiny_llava_next(path, **DECODERS[request.param])
  model.config._attn_implementation = "eager"
  ours = air_jax.load_pretrained(path)
  return request.param, model, processor, ours


def _hf_inputs(processor, images, prompts):
  inputs = processor(images=images, text=chat_texts(processor, prompts), return_tensors="pt", padding=True)
  mask = inputs["attention_mask"]
  inputs["position_ids"] = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
  return inputs


def test_config_family_and_param_count(tiny_next):
  name, model, _, ours = tiny_next
  assert family.family_of(ours.config).name == "llava_next"
  assert isinstance(ours.config, llava_next.LlavaNextConfig)
  assert ours.config.text.model_type == name
  assert ours.config.text.sliding_window == (24 if name == "mistral" else None)
  assert ours.num_params() == sum(p.numel() for p in model.parameters())


def test_logits_and_attentions_match_transformers(tiny_next):
  _, model, processor, ours = tiny_next
  images = random_images_sized(SIZES, seed=1)
  inputs = _hf_inputs(processor, images, PROMPTS)
  mask = inputs["attention_mask"].numpy().astype(bool)
  assert not mask[2].all(), "the batch must exercise left padding"
  with torch.no_grad():
    ref = model(**inputs, output_attentions=True)
  vision = llava_next.vision_inputs(ours.config, inputs["pixel_values"].numpy(), inputs["image_sizes"].numpy(),
                                    [1, 1, 1])
  out = llava.forward(ours.params, ours.config, inputs["input_ids"].numpy(), vision,
                      attention_mask=inputs["attention_mask"].numpy(), output_attentions=True)
  np.testing.assert_allclose(np.asarray(out["logits"])[mask], ref.logits.numpy()[mask], atol=1e-5, rtol=1e-5)
  for layer, ref_att in enumerate(ref.attentions):
    ours_att, ref_att = np.asarray(out["attentions"][layer]), ref_att.numpy()
    for b in range(len(SIZES)):
      v = mask[b]
      np.testing.assert_allclose(ours_att[b][:, v][:, :, v], ref_att[b][:, v][:, :, v], atol=1e-5)


def test_two_images_in_one_prompt_match_and_segment(tiny_next):
  """Several image runs in one sequence: logits equal transformers; segments follow the image-token positions."""
  _, model, processor, ours = tiny_next
  images = random_images_sized([(30, 70), (64, 40), (50, 50)], seed=2)
  msgs = [[{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare."}]}],
          [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}]]
  texts = [processor.apply_chat_template(m, add_generation_prompt=True) for m in msgs]
  inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
  with torch.no_grad():
    ref = model(**inputs).logits.numpy()
  ids, mask = inputs["input_ids"].numpy(), inputs["attention_mask"].numpy()
  vision = llava_next.vision_inputs(ours.config, inputs["pixel_values"].numpy(), inputs["image_sizes"].numpy(),
                                    [2, 1])
  out = llava.forward(ours.params, ours.config, ids, vision, attention_mask=mask)
  valid = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(out["logits"])[valid], ref[valid], atol=1e-5, rtol=1e-5)
  seg = np.asarray(family.family_of(ours.config).segments(ours.config, jnp.asarray(ids), jnp.asarray(mask)))
  is_img = (ids == ours.config.image_token_id) & valid
  first = np.argmax(is_img, axis=1)
  cols = np.arange(ids.shape[1])[None]
  np.testing.assert_array_equal(seg == IMAGE, is_img)
  np.testing.assert_array_equal(seg == SYSTEM, valid & (cols < first[:, None]))
  np.testing.assert_array_equal(seg == TEXT, valid & ~is_img & (cols > first[:, None]))
  np.testing.assert_array_equal(seg == PAD, ~valid)
  # Example 0 holds two runs of image tokens separated by text (the newline after the first image).
  runs = np.diff(is_img[0].astype(int))
  assert (runs == 1).sum() == 2 and (seg[0][first[0]:] == TEXT).any()


def test_greedy_tokens_match_transformers_generate(tiny_next):
  _, model, processor, ours = tiny_next
  images = random_images_sized(SIZES[:2], seed=3)
  out = air_jax.generate(ours, None, images, PROMPTS[:2], max_new_tokens=32)
  inputs = _hf_inputs(processor, images, PROMPTS[:2])
  inputs.pop("position_ids")
  with torch.no_grad():
    ref = model.generate(**inputs, max_new_tokens=32, do_sample=False)
  ref = ref[:, inputs["input_ids"].shape[1]:].numpy()
  assert ref.shape[1] == 32, "at least one row must run the full 32 tokens"
  np.testing.assert_array_equal(out.token_ids, ref)


def test_vision_inputs_reject_mismatched_prompts(tiny_next):
  _, _, processor, ours = tiny_next
  images = random_images_sized(SIZES[:1], seed=4)
  inputs = _hf_inputs(processor, images, PROMPTS[:1])
  vision = llava_next.vision_inputs(ours.config, inputs["pixel_values"].numpy(), inputs["image_sizes"].numpy(), [1])
  vision["image_tokens"] = vision["image_tokens"] + 1
  with pytest.raises(ValueError, match="image tokens"):
    llava.forward(ours.params, ours.config, inputs["input_ids"].numpy(), vision)


# ---- AIR, attribution and eval.chair end to end on the tiny LLaVA-NeXT (Llama decoder) ----


@pytest.fixture(scope="module")
def next_llama(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tiny_next_e2e"))
  model, processor = make_tiny_llava_next(path, seed=1)
  model.config._attn_implementation = "eager"
  return path, model, processor, air_jax.load_pretrained(path)


@pytest.mark.parametrize("name", ["air", "air_star"])
def test_air_greedy_tokens_match_patched_transformers(next_llama, name):
  from models.segments import segment_ids
  from tests.hf_air_reference import air_attention_patch

  _, model, processor, ours = next_llama
  cfg = {"air": air_jax.AIRConfig.preset("air", heads=[(0, 1), (1, 2), (1, 0)], tau_text=0.1),
         "air_star": air_jax.AIRConfig.preset("air_star", heads="all", qk_rescale=True, adhh_threshold=0.2)}[name]
  images = random_images_sized(SIZES[:2], seed=5)
  n = 12
  got = air_jax.generate(ours, cfg, images, PROMPTS[:2], max_new_tokens=n, bucket=0)
  plain = air_jax.generate(ours, None, images, PROMPTS[:2], max_new_tokens=n, bucket=0)
  inputs = _hf_inputs(processor, images, PROMPTS[:2])
  inputs.pop("position_ids")
  seg = np.asarray(segment_ids(jnp.asarray(inputs["input_ids"].numpy()),
                               jnp.asarray(inputs["attention_mask"].numpy()), ours.config.image_token_id))
  d = ours.config.dims
  with air_attention_patch(cfg, seg, d.num_hidden_layers, d.num_attention_heads), torch.no_grad():
    ref = model.generate(**inputs, max_new_tokens=n, do_sample=False)
  ref = ref[:, inputs["input_ids"].shape[1]:].numpy()
  assert (got.token_ids != plain.token_ids).any(), "the method must change the generation for the test to bite"
  np.testing.assert_array_equal(got.token_ids[:, :ref.shape[1]], ref)


def test_attribution_runs_and_its_clean_logprobs_equal_the_forward(next_llama):
  from air_jax.attribution import Attributor
  from air_jax.attribution_core import head_logprobs

  _, _, _, ours = next_llama
  att = Attributor(ours)
  image = random_images_sized([(50, 90)], seed=6)[0]
  prompt_ids, vision = att.prompt_inputs(image)
  _, ids, _ = att.caption_inputs("A cat sits on a red chair next to a dog.")
  seq = np.concatenate([prompt_ids, ids]).astype(np.int32)
  positions = [len(prompt_ids), len(seq) - 2]
  clean, abl = head_logprobs(att.params, ours.config, seq, vision, positions, chunk=4)
  d = ours.config.dims
  assert abl.shape == (2, d.num_hidden_layers, d.num_attention_heads)
  logits = np.asarray(llava.forward(ours.params, ours.config, seq[None], vision)["logits"][0], np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1,
                                                                                                          keepdims=True)
  np.testing.assert_allclose(clean, logp[np.asarray(positions) - 1, seq[positions]], atol=1e-5)
  assert np.abs(abl - clean[:, None, None]).max() > 1e-4  # ablations matter
  full_clean, full_abl = head_logprobs(att.params, ours.config, seq, vision, positions, semantics="full_sequence",
                                       chunk=4)
  np.testing.assert_allclose(full_clean, clean, atol=1e-5)


@pytest.mark.slow
def test_eval_chair_end_to_end(next_llama, tmp_path, capsys):
  import json
  import os

  from eval.chair import main

  path = next_llama[0]
  coco = os.path.join(os.path.dirname(__file__), "fixtures", "coco")
  heads = tmp_path / "heads.json"
  air_jax.write_heads_file(heads, [(0, 1), (1, 2)])
  argv = ["--coco-root", coco, "--model", path, "--num-images", "3", "--max-new-tokens", "5", "--batch-size", "2",
          "--backend", "cpu", "--out", str(tmp_path), "--no-progress", "--method", "greedy,air", "--heads", str(heads)]
  assert main(argv) == 0
  assert "air" in capsys.readouterr().out
  for method in ("greedy", "air"):
    assert len((tmp_path / f"{method}_captions.jsonl").read_text().splitlines()) == 3
    result = json.loads((tmp_path / f"{method}_chair.json").read_text())
    assert len(result["sentences"]) + len(result["skipped"]) == 3


@pytest.mark.parametrize("layout", ["legacy", "4.5x"])
def test_other_key_layouts_load_identically(next_llama, layout, tmp_path):
  import os

  from convert.checkpoint import load_params
  from convert.safetensors_io import read_safetensors
  from tests.test_convert import _as_layout, _copy_with

  path, _, _, ours = next_llama
  tensors = read_safetensors(os.path.join(path, "model.safetensors"))
  renamed = {_as_layout(k, layout): v for k, v in tensors.items()}
  assert ("model.image_newline" in renamed) == (layout == "4.5x")
  _copy_with(path, str(tmp_path), renamed)
  got = load_params(str(tmp_path), ours.config)
  import jax

  jax.tree.map(np.testing.assert_array_equal, got, jax.tree.map(np.asarray, ours.params))
