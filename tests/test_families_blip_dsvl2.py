"""InstructBLIP and DeepSeek-VL2 behind the family interface: load_pretrained, greedy generate equal to the
reference over 32 tokens, AIR, head attribution (eval.attribute) and eval.chair end to end on tiny checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import air_jax
from models.family import family_of

FIXTURE = Path(__file__).parent / "fixtures" / "coco"
PROMPTS = ["Please describe this image in detail.", "What is in the picture?"]


def pil_images():
  from PIL import Image

  rng = np.random.default_rng(5)
  return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in ((40, 30), (30, 80))]


@pytest.fixture(scope="module")
def blip(tmp_path_factory):
  from tests.tiny_instructblip import make_tiny_instructblip

  path = str(tmp_path_factory.mktemp("blip"))
  model, _ = make_tiny_instructblip(path)
  model.config._attn_implementation = "eager"
  return path, model


@pytest.fixture(scope="module")
def dsvl2(tmp_path_factory):
  from tests.tiny_deepseek_vl2 import make_tiny_deepseek_vl2

  path = str(tmp_path_factory.mktemp("dsvl2"))
  ref, _ = make_tiny_deepseek_vl2(path)
  return path, ref


def test_instructblip_generate_matches_transformers(blip):
  path, ref = blip
  model = air_jax.load_pretrained(path)
  assert family_of(model.config).name == "instructblip"
  fam = family_of(model.config)
  batch = fam.prepare_inputs(model.processor, model.config, pil_images(), PROMPTS, 0)
  assert not batch["attention_mask"][1].all() and batch["attention_mask"][1, :6].all()  # the gap after queries
  assert batch["vision"]["qformer_attention_mask"][1, -1] == 0  # Q-Former instruction right padded
  tok = model.processor.tokenizer
  real = batch["input_ids"][0][batch["attention_mask"][0] == 1][6:]
  assert real.tolist() == tok(PROMPTS[0])["input_ids"]  # the raw prompt: no chat template, no LLaVA fallback
  out = air_jax.generate(model, None, pil_images(), PROMPTS, max_new_tokens=32, bucket=0)
  v = batch["vision"]
  with torch.no_grad():
    want = ref.generate(input_ids=torch.tensor(batch["input_ids"], dtype=torch.long),
                        attention_mask=torch.tensor(batch["attention_mask"], dtype=torch.long),
                        pixel_values=torch.tensor(v["pixel_values"]),
                        qformer_input_ids=torch.tensor(v["qformer_input_ids"], dtype=torch.long),
                        qformer_attention_mask=torch.tensor(v["qformer_attention_mask"], dtype=torch.long),
                        max_new_tokens=32, do_sample=False)
  want = want[:, batch["input_ids"].shape[1]:].numpy()
  for b in range(2):
    n = int(out.num_tokens[b])
    np.testing.assert_array_equal(out.token_ids[b, :n], want[b, :n])
  # The processor's image token is a tokenizers.AddedToken: a prompt holding it is still named.
  with pytest.raises(ValueError, match="prompt 0 contains the image placeholder '<image>'"):
    air_jax.generate(model, None, pil_images()[:1], ["<image> " + PROMPTS[0]], max_new_tokens=2)


def _reference_greedy(ref, ids, mask, tiles, crops, image_token_id, n):
  emb = ref.embeds(torch.tensor(ids, dtype=torch.long), torch.tensor(tiles), crops, image_token_id)
  with torch.no_grad():
    out = ref.language.generate(inputs_embeds=emb, attention_mask=torch.tensor(mask, dtype=torch.long),
                                max_new_tokens=n, do_sample=False)
  return out.numpy()


def test_deepseek_vl2_generate_matches_reference(dsvl2):
  path, ref = dsvl2
  model = air_jax.load_pretrained(path)
  fam = family_of(model.config)
  assert fam.name == "deepseek_vl2"
  batch = fam.prepare_inputs(model.processor, model.config, pil_images(), PROMPTS, 0)
  v = batch["vision"]
  assert v["crops"].tolist() == [[2, 1], [1, 2]] and v["tiles"].shape[:2] == (2, 3)
  out = air_jax.generate(model, None, pil_images(), PROMPTS, max_new_tokens=32, bucket=0)
  crops = [tuple(c) for c in v["crops"].tolist()]
  tiles = np.concatenate([v["tiles"][b, : 1 + tw * th] for b, (tw, th) in enumerate(crops)])
  with torch.no_grad():
    want = _reference_greedy(ref, batch["input_ids"], batch["attention_mask"], tiles, crops,
                             model.config.image_token_id, 32)
  for b in range(2):
    n = int(out.num_tokens[b])
    np.testing.assert_array_equal(out.token_ids[b, :n], want[b, :n])
  assert out.num_tokens.max() > 8


@pytest.mark.slow
@pytest.mark.parametrize("which", ["blip", "dsvl2"])
def test_air_attribution_and_chair_end_to_end(which, request, tmp_path):
  from eval import attribute
  from eval.chair import main as chair_main
  from eval.chair import run as chair_run

  path, _ = request.getfixturevalue(which)
  model = air_jax.load_pretrained(path)
  dims = model.config.dims
  heads = [[1, 0], [1, dims.num_attention_heads - 1]]
  cfg = air_jax.AIRConfig.preset("air_star", heads=heads)
  base = air_jax.generate(model, None, pil_images()[:1], PROMPTS[0], max_new_tokens=8, bucket=0,
                          output_attention_stats=True)
  air = air_jax.generate(model, cfg, pil_images()[:1], PROMPTS[0], max_new_tokens=8, bucket=0,
                         output_attention_stats=True)
  assert air.segment_mass.shape[2:] == (dims.num_hidden_layers, dims.num_attention_heads, 3)
  assert not np.allclose(air.segment_mass, base.segment_mass)  # the intervention reached the attention
  # Head attribution (gradient screen, then vmapped ablations through the family's decoder) on hand-made CHAIR
  # results.
  caps = tmp_path / "hand_captions.jsonl"
  caps.write_text(json.dumps({"image_id": 296284, "caption": "A donut sits next to a dog. The dog eats a donut."})
                  + "\n")
  chair_run(["--coco-root", str(FIXTURE), "--captions", str(caps), "--method", "hand", "--out", str(tmp_path),
             "--no-progress"])
  out = tmp_path / "attr"
  attribute.run(["--chair-json", str(tmp_path / "hand_chair.json"), "--coco-root", str(FIXTURE), "--model", path,
                 "--out", str(out), "--top-k", "2", "--chunk", "4", "--no-progress", "--backend", "cpu",
                 "--screen", "3"])
  # The gradient screen ranked every head, then the 3 heads it chose were ablated exactly.
  summary = json.loads((out / "summary.json").read_text())
  assert summary["screen"]["k"] == 3
  assert len(air_jax.read_heads_file(str(out / "heads_S.json"))) == 2
  # eval.chair: greedy and AIR captions generated through the family and scored.
  res = tmp_path / "chair"
  assert chair_main(["--coco-root", str(FIXTURE), "--model", path, "--num-images", "2", "--max-new-tokens", "6",
                     "--batch-size", "2", "--backend", "cpu", "--out", str(res), "--no-progress",
                     "--method", "greedy", "--method", "air_star", "--heads", str(out / "heads_S.json")]) == 0
  for method in ("greedy", "air_star"):
    assert len((res / f"{method}_captions.jsonl").read_text().splitlines()) == 2
    assert (res / f"{method}_chair.json").is_file()
