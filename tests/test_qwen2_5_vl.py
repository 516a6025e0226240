"""Qwen2.5-VL vs transformers' eager Qwen2_5_VLForConditionalGeneration on a tiny random checkpoint.

Three images of different sizes (one prompt holds two of them) in a left-padded batch: processor outputs, the
window-attention vision tower, logits and attention probabilities, M-RoPE positions, 32 greedy tokens.
"""


import numpy as np
import pytest
import torch

from convert.hf_qwen2_5_vl import load_params, load_processor
from models import qwen2_5_vl, qwen_vision
from tests.tiny_vl import chat, check_transformers_5_processor_layout, make_tiny_qwen2_5_vl, random_image
from tests.vl_reference import assert_logits_and_attentions, eager, greedy_full_forward

PROMPTS = ["Please describe this image in detail.", "What is in the picture?"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  import jax
  import jax.numpy as jnp

  path = str(tmp_path_factory.mktemp("qwen25vl"))
  model, hf_proc = make_tiny_qwen2_5_vl(path)
  eager(model)
  # 80x48: windows padded on both axes; 64x64; 56x40 -> 64x32 after smart resize (4 merged units wide).
  images = [random_image(48, 80, 1), random_image(64, 64, 2), random_image(40, 56, 3)]
  texts = [chat(hf_proc, PROMPTS[0], 2), chat(hf_proc, PROMPTS[1], 1)]
  hf_proc.tokenizer.padding_side = "left"
  inputs = hf_proc(images=images, text=texts, return_tensors="pt", padding=True)
  config = qwen2_5_vl.load_config(path)
  params = jax.tree.map(jnp.asarray, load_params(path, config))
  return dict(path=path, model=model, hf_proc=hf_proc, images=images, texts=texts, inputs=inputs, config=config,
              params=params)


def _np(inputs):
  return {k: v.numpy() for k, v in inputs.items()}


def test_processor_without_video_processor_matches_transformers(tiny):
  proc = load_processor(tiny["path"])
  proc.tokenizer.padding_side = "left"
  assert proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
                                  add_generation_prompt=True) == chat(tiny["hf_proc"], "hi")
  ours = proc(images=tiny["images"], text=tiny["texts"], return_tensors="np", padding=True)
  ref = _np(tiny["inputs"])
  assert sorted(ours) == sorted(ref)
  for k in ref:
    np.testing.assert_array_equal(ours[k], ref[k], err_msg=k)
  assert not ref["attention_mask"][1].all(), "the batch must exercise left padding"
  assert len({tuple(g) for g in ref["image_grid_thw"].tolist()}) == 3
  with pytest.raises(ValueError, match="video inputs are not supported"):
    proc(images=None, text=["x"], videos=[np.zeros((2, 8, 8, 3), np.uint8)])


def test_processor_takes_numpy_images_as_transformers(tiny):
  proc = load_processor(tiny["path"])
  hwc = np.asarray(tiny["images"][2])  # [H, W, 3] uint8
  gray = hwc[..., 0]  # [H, W]
  texts = [chat(tiny["hf_proc"], "hi")] * 3
  for img in (hwc, hwc.transpose(2, 0, 1), gray[None]):  # channels last, channels first, [1, H, W] grayscale
    ours = proc(images=[img, img, img], text=texts, return_tensors="np", padding=True)
    ref = dict(tiny["hf_proc"](images=[img, img, img], text=texts, return_tensors="np", padding=True))
    assert sorted(ours) == sorted(ref)
    for k in ref:
      np.testing.assert_array_equal(ours[k], ref[k], err_msg=f"{k} {img.shape}")


def test_processor_loads_the_transformers_5_layout(tiny, tmp_path):
  check_transformers_5_processor_layout(tiny["path"], tiny["hf_proc"], load_processor, tiny["images"][2], tmp_path)


def test_vision_tower_matches_transformers(tiny):
  import jax.numpy as jnp

  inp, cfg = tiny["inputs"], tiny["config"]
  with torch.no_grad():
    ref = tiny["model"].model.visual(inp["pixel_values"], grid_thw=inp["image_grid_thw"]).pooler_output.numpy()
  plan = qwen_vision.vision_plan(cfg.vision, inp["image_grid_thw"].numpy())
  ours = qwen_vision.forward(tiny["params"]["visual"], cfg.vision, jnp.asarray(inp["pixel_values"].numpy()), plan)
  np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-5, rtol=1e-5)


def test_rope_index_matches_transformers(tiny):
  inp = tiny["inputs"]
  ref_pos, ref_delta = tiny["model"].model.get_rope_index(
      inp["input_ids"], mm_token_type_ids=inp["mm_token_type_ids"], image_grid_thw=inp["image_grid_thw"],
      attention_mask=inp["attention_mask"])
  cfg, n = tiny["config"], _np(inp)
  pos, delta = qwen2_5_vl.rope_index(cfg, n["input_ids"], n["attention_mask"], n["image_grid_thw"])
  np.testing.assert_array_equal(pos, ref_pos.numpy())
  np.testing.assert_array_equal(delta, ref_delta.numpy().reshape(-1))
  vision = qwen2_5_vl.vision_inputs(cfg, n["pixel_values"], n["image_grid_thw"],
                                    qwen2_5_vl.images_per_row(cfg, n["input_ids"]))
  traced = qwen2_5_vl.positions(cfg, n["input_ids"], n["attention_mask"], vision)
  np.testing.assert_array_equal(np.asarray(traced), ref_pos.numpy())


def test_logits_and_attentions_match_transformers(tiny):
  inp = tiny["inputs"]
  with torch.no_grad():
    ref = tiny["model"](**inp, output_attentions=True)
  n = _np(inp)
  out = qwen2_5_vl.forward(tiny["params"], tiny["config"], n["input_ids"], n["pixel_values"], n["image_grid_thw"],
                           attention_mask=n["attention_mask"], output_attentions=True)
  assert_logits_and_attentions(out, ref, n["attention_mask"])


def test_param_count_matches_transformers(tiny):
  from models.params import count_params

  assert count_params(tiny["params"]) == sum(p.numel() for p in tiny["model"].parameters())


def test_greedy_32_tokens_match_transformers_generate(tiny):
  inp, cfg = tiny["inputs"], tiny["config"]
  eos = cfg.text.eos_token_id
  with torch.no_grad():
    ref = tiny["model"].generate(**inp, max_new_tokens=32, min_new_tokens=32, do_sample=False, eos_token_id=list(eos))
  n = _np(inp)
  step = lambda ids, mask: qwen2_5_vl.forward(tiny["params"], cfg, ids, n["pixel_values"], n["image_grid_thw"],
                                              attention_mask=mask)["logits"]
  ours = greedy_full_forward(step, n["input_ids"], n["attention_mask"], 32, eos)
  np.testing.assert_array_equal(ours, ref[:, n["input_ids"].shape[1]:].numpy())


def test_bad_inputs_are_clear_errors(tiny):
  n, cfg = _np(tiny["inputs"]), tiny["config"]
  ids = n["input_ids"].copy()
  first = np.argmax(ids[0] == cfg.image_token_id)
  ids[0, first] = 5  # one image token fewer than the features
  with pytest.raises(ValueError, match="image tokens .* but image_grid_thw"):
    qwen2_5_vl.forward(tiny["params"], cfg, ids, n["pixel_values"], n["image_grid_thw"],
                       attention_mask=n["attention_mask"])
  with pytest.raises(ValueError, match="patches but image_grid_thw describes"):
    qwen2_5_vl.forward(tiny["params"], cfg, n["input_ids"], n["pixel_values"][:-4], n["image_grid_thw"],
                       attention_mask=n["attention_mask"])
  bad_grid = n["image_grid_thw"].copy()
  bad_grid[0, 1] = 1  # an image smaller than one 2x2 merge unit
  with pytest.raises(ValueError, match="multiples of spatial_merge_size"):
    qwen2_5_vl.forward(tiny["params"], cfg, n["input_ids"], n["pixel_values"], bad_grid,
                       attention_mask=n["attention_mask"])
  proc = load_processor(tiny["path"])
  with pytest.raises(ValueError, match="aspect ratio"):
    proc(images=[random_image(1, 300)], text=[chat(tiny["hf_proc"], "x")])
  with pytest.raises(ValueError, match="1 <|image_pad|> placeholders but 2 images"):
    proc(images=tiny["images"][:2], text=[chat(tiny["hf_proc"], "x")])
