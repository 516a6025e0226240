"""The official-air protocol: prompts, padding and batches equal the official AIR CHAIR script's (token ids).

The reference below re-states, independently of air_jax.conversation / air_jax.protocol, what the official run
does (AIR `eval_scripts/eval_caption_air.py` with `--conv-mode vicuna_v1 --batch-size 4`): COCO().getImgIds()
order, `random.sample` after seeding 42, "<image>\\n" + question in the vicuna_v1 conversation, LLaVA's
`tokenizer_image_token` (chunks tokenised separately, -200 between them), `torch.stack` of batches of 4 in order
(no padding), expand2square with the mean colour before the image processor.
"""

from __future__ import annotations

import json
import os
import random
import sys

import numpy as np
import pytest

import air_jax
from air_jax import conversation
from eval.chair import main
from tests.tiny import random_images

COCO = os.path.join(os.path.dirname(__file__), "fixtures", "coco")
QUESTION = "Please describe this image in detail."
VICUNA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                    "helpful, detailed, and polite answers to the user's questions.")
OFFICIAL_IMAGE_INDEX = -200


def official_prompt_ids(tokenizer, question: str) -> list[int]:
  """conv_templates["vicuna_v1"] + tokenizer_image_token, as the official script runs them."""
  prompt = VICUNA_V1_SYSTEM + " " + "USER: " + "<image>\n" + question + " " + "ASSISTANT:"
  chunks = [tokenizer(c).input_ids for c in prompt.split("<image>")]
  out, offset = [], 0
  if chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
    offset = 1
    out.append(chunks[0][0])
  seps = [[OFFICIAL_IMAGE_INDEX] * (offset + 1)] * len(chunks)
  for x in [e for pair in zip(chunks, seps) for e in pair][:-1]:
    out.extend(x[offset:])
  return out


def expand(ids: list[int], image_id: int, n: int) -> list[int]:
  """The official model's expansion of its one image index into n image positions (HF token layout)."""
  out = []
  for t in ids:
    out.extend([image_id] * n if t == OFFICIAL_IMAGE_INDEX else [t])
  return out


def expand2square(img, color):
  from PIL import Image

  w, h = img.size
  if w == h:
    return img
  if w > h:
    res = Image.new(img.mode, (w, w), color)
    res.paste(img, (0, (w - h) // 2))
  else:
    res = Image.new(img.mode, (h, h), color)
    res.paste(img, ((h - w) // 2, 0))
  return res


def _image_tokens(tiny_model) -> int:
  ids, _, _ = air_jax.generate_inputs(tiny_model, random_images(1, 28, seed=0), QUESTION)
  return int((ids == tiny_model.config.image_token_id).sum())


def test_templates_cover_llava_and_vicuna_v1_text():
  assert conversation.get_template("vicuna_v1").prompt("Q") == f"{VICUNA_V1_SYSTEM} USER: <image>\nQ ASSISTANT:"
  assert set(conversation.CONV_TEMPLATES) == {
      "default", "v0", "v1", "vicuna_v1", "llama_2", "mistral_instruct", "chatml_direct", "mistral_direct",
      "plain", "v0_plain", "llava_v0", "v0_mmtag", "llava_v1", "v1_mmtag", "llava_llama_2", "mpt"}
  assert conversation.get_template("llava_v0").prompt("Q").endswith("###Human: <image>\nQ###Assistant:")
  assert conversation.get_template("mistral_instruct").prompt("Q") == "[INST] <image>\nQ [/INST]"
  assert conversation.get_template("llava_llama_2").prompt("Q").startswith("[INST] <<SYS>>\nYou are a helpful")
  assert conversation.get_template("mpt").prompt("Q").endswith("<|im_start|>user\n<image>\nQ<|im_end|>"
                                                               "<|im_start|>assistant\n")
  assert conversation.get_template("plain").prompt("Q") == "<image>\nQ\n"
  with pytest.raises(ValueError, match="vicuna_v2"):
    conversation.get_template("vicuna_v2")


def test_official_prompt_ids_and_pixels(tiny_model):
  images = random_images(2, 28, seed=41)
  images = [images[0].resize((40, 28)), images[1].resize((28, 36))]  # not square: the padding matters
  ids, mask, pixels = air_jax.generate_inputs(tiny_model, images, QUESTION, protocol="official-air")
  proc = tiny_model.processor
  n_img = _image_tokens(tiny_model)
  want = expand(official_prompt_ids(proc.tokenizer, QUESTION), tiny_model.config.image_token_id, n_img)
  np.testing.assert_array_equal(ids, np.array([want, want]))
  assert mask.all()  # no padding at all
  color = tuple(int(x * 255) for x in proc.image_processor.image_mean)
  ref = proc.image_processor([expand2square(im, color) for im in images], return_tensors="np")["pixel_values"]
  np.testing.assert_allclose(pixels, ref, atol=1e-6)
  # the processor's own template (default protocol) is a different prompt
  default_ids, _, _ = air_jax.generate_inputs(tiny_model, images, QUESTION)
  assert default_ids.shape != ids.shape or (default_ids != ids).any()


def test_unequal_prompts_run_as_equal_length_groups(tiny_model):
  images = random_images(3, 28, seed=42)
  prompts = [QUESTION, "Hi", QUESTION]
  out = air_jax.generate(tiny_model, None, images, prompts, max_new_tokens=3, protocol="official-air")
  lengths = out.prompt_mask.sum(1)
  assert lengths[0] == lengths[2] != lengths[1]
  pair = air_jax.generate(tiny_model, None, [images[0], images[2]], [QUESTION] * 2, max_new_tokens=3,
                          protocol="official-air")
  np.testing.assert_array_equal(out.token_ids[[0, 2]], pair.token_ids)
  one = air_jax.generate(tiny_model, None, images[1], "Hi", max_new_tokens=3, protocol="official-air")
  np.testing.assert_array_equal(out.token_ids[1], one.token_ids[0])
  assert one.prompt_mask.all() and pair.prompt_mask.all()


def test_chair_official_protocol_batches_equal_the_official_run(tiny_dir, tiny_model, tmp_path, monkeypatch):
  """eval.chair --protocol official-air: every generation call's ids equal the official script's batch."""
  calls = []
  gen = sys.modules["air_jax.generate"]  # the package attribute `generate` is the function
  original = gen._run

  def recording_run(params, run, spec, ids, mask, pixels, devices, **kw):
    calls.append((np.asarray(ids).copy(), np.asarray(mask).copy(), kw.get("finished_pad")))
    return original(params, run, spec, ids, mask, pixels, devices, **kw)

  monkeypatch.setattr(gen, "_run", recording_run)
  n = 10
  argv = ["--coco-root", COCO, "--model", tiny_dir, "--num-images", str(n), "--max-new-tokens", "2",
          "--backend", "cpu", "--out", str(tmp_path), "--no-progress", "--protocol", "official-air"]
  assert main(argv) == 0

  # The official sample and batches: COCO(captions).getImgIds() order, random.sample after seed 42, 4 per batch.
  with open(os.path.join(COCO, "annotations", "captions_val2014.json")) as f:
    img_ids = [im["id"] for im in json.load(f)["images"]]
  random.seed(42)
  sample = random.sample(img_ids, n)
  batches = [sample[i:i + 4] for i in range(0, n, 4)]
  records = [json.loads(x) for x in (tmp_path / "greedy_captions.jsonl").read_text().splitlines()]
  assert [r["image_id"] for r in records] == sample
  assert all(r["protocol"] == "official-air" for r in records)
  want = expand(official_prompt_ids(tiny_model.processor.tokenizer, QUESTION), tiny_model.config.image_token_id,
                _image_tokens(tiny_model))
  assert [c[0].shape[0] for c in calls] == [len(b) for b in batches]  # 4, 4, 2: no filler rows
  unk = tiny_model.processor.tokenizer.unk_token_id
  assert unk is not None and unk != tiny_model.processor.tokenizer.pad_token_id
  for ids, mask, finished_pad in calls:
    np.testing.assert_array_equal(ids, np.array([want] * ids.shape[0]))
    assert mask.all()
    assert finished_pad == unk  # ended rows are fed LLaVA's pad id (the unknown token), as the official loop
  result = json.loads((tmp_path / "greedy_chair.json").read_text())
  assert result["config"]["protocol"]["name"] == "official-air" and result["config"]["batch_size"] == 4
  assert result["config"]["protocol"]["conv_template"] == "vicuna_v1"


def test_official_protocol_reads_layer_ranges_absolutely_13b():
  """13B (40 layers): official-air keeps [5, 18) / [9, 15); the default protocol scales them to [6, 23) / [11, 19)."""
  from air_jax.protocol import PROTOCOLS
  from models.config import LlavaConfig, TextConfig

  cfg13 = LlavaConfig(text=TextConfig(num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40))
  layers = lambda op: np.flatnonzero(np.asarray(op.heads).any(-1)).tolist()
  official = air_jax.AIRConfig.preset("air_star", heads=air_jax.LLAVA15_13B_HAL_HEADS,
                                      **PROTOCOLS["official-air"].air_overrides()).compile(cfg13).ops
  assert layers(official.projection) == list(range(5, 18)) and layers(official.lens) == list(range(5, 18))
  assert layers(official.rebalance) == list(range(9, 15))
  assert float(official.adhh.batch_sum[0]) == 1.0 and float(official.projection.official_compat[0]) == 1.0
  scaled = air_jax.AIRConfig.preset("air_star", heads=air_jax.LLAVA15_13B_HAL_HEADS).compile(cfg13).ops
  assert layers(scaled.projection) == list(range(6, 23)) and layers(scaled.rebalance) == list(range(11, 19))
  assert layers(official.adhh) == sorted({l for l, _ in air_jax.LLAVA15_13B_HAL_HEADS})
