"""InternVL vs transformers' eager InternVLForConditionalGeneration on tiny random checkpoints.

Three images of aspect ratios 2, 1 and 3 (2 + thumbnail, 1, 3 + thumbnail tiles; one prompt holds two images) in a batch the
processor left-pads: processor outputs, the vision features, logits and attention probabilities, 32 greedy tokens.
The decoder/tower variants run as a small grid (Qwen3 + LayerNorm; Qwen2 + RMSNorm + qk norm + final layernorm +
tied head; an intermediate feature layer).
"""


import numpy as np
import pytest
import torch

from convert.hf_internvl import load_params, load_processor
from models import internvl
from tests.tiny_vl import chat, check_transformers_5_processor_layout, make_tiny_internvl, random_image
from tests.vl_reference import assert_logits_and_attentions, eager, greedy_full_forward

PROMPTS = ["Please describe this image in detail.", "What is in the picture?"]
VARIANTS = {
    "qwen3": {},
    "qwen2_rms_qknorm_tied": dict(text_type="qwen2", norm_type="rms_norm", use_qk_norm=True, use_mean_pooling=False,
                                  tie_word_embeddings=True),
    "feature_layer_-2": dict(vision_feature_layer=-2, use_mean_pooling=False),
}


def _build(path, **kw):
  import jax
  import jax.numpy as jnp

  model, hf_proc = make_tiny_internvl(path, **kw)
  eager(model)
  images = [random_image(64, 32, 1), random_image(32, 32, 2), random_image(90, 30, 3)]
  texts = [chat(hf_proc, PROMPTS[0], 2), chat(hf_proc, PROMPTS[1], 1)]
  inputs = hf_proc(images=images, text=texts, return_tensors="pt", padding=True)
  mask = inputs["attention_mask"]
  inputs["position_ids"] = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # generate's convention
  config = internvl.load_config(path)
  params = jax.tree.map(jnp.asarray, load_params(path, config))
  return dict(path=path, model=model, hf_proc=hf_proc, images=images, texts=texts, inputs=inputs, config=config,
              params=params)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  return _build(str(tmp_path_factory.mktemp("internvl")))


def _np(inputs):
  return {k: v.numpy() for k, v in inputs.items()}


def _check_forward(t):
  inp = t["inputs"]
  with torch.no_grad():
    ref = t["model"](**inp, output_attentions=True)
  n = _np(inp)
  out = internvl.forward(t["params"], t["config"], n["input_ids"], n["pixel_values"],
                         attention_mask=n["attention_mask"], output_attentions=True)
  assert_logits_and_attentions(out, ref, n["attention_mask"])
  from models.params import count_params

  assert count_params(t["params"]) == sum(p.numel() for p in t["model"].parameters())


def test_processor_without_video_processor_matches_transformers(tiny):
  proc = load_processor(tiny["path"])
  assert proc.tokenizer.padding_side == "right", "the processor must left-pad whatever the tokenizer says"
  ours = proc(images=tiny["images"], text=tiny["texts"], return_tensors="np", padding=True)
  ref = _np(tiny["inputs"])
  for k in ("input_ids", "attention_mask", "pixel_values"):
    np.testing.assert_array_equal(ours[k], ref[k], err_msg=k)
  assert not ref["attention_mask"][1, 0], "the batch must exercise left padding"
  assert ours["num_patches"].tolist() == [3, 1, 4]  # 2x1 + thumbnail, one tile, 3x1 + thumbnail
  ids = ours["input_ids"][0]
  tok = proc.tokenizer
  assert (ids == tok.convert_tokens_to_ids("<img>")).sum() == 2
  assert (ids == tok.convert_tokens_to_ids("</img>")).sum() == 2


def test_processor_takes_numpy_images_as_transformers(tiny):
  proc = load_processor(tiny["path"])
  hwc = np.asarray(tiny["images"][0])  # [H, W, 3] uint8, tiled 2x1 + thumbnail
  texts = [chat(tiny["hf_proc"], "hi")]
  for img in (hwc, hwc.transpose(2, 0, 1)):  # channels last, channels first
    ours = proc(images=[img], text=texts, return_tensors="np", padding=True)
    ref = dict(tiny["hf_proc"](images=[img], text=texts, return_tensors="np", padding=True))
    for k in ("input_ids", "attention_mask", "pixel_values"):
      np.testing.assert_array_equal(ours[k], ref[k], err_msg=f"{k} {img.shape}")


def test_processor_loads_the_transformers_5_layout(tiny, tmp_path):
  check_transformers_5_processor_layout(tiny["path"], tiny["hf_proc"], load_processor, tiny["images"][0], tmp_path)


def test_vision_features_match_transformers(tiny):
  import jax.numpy as jnp

  cfg, inp = tiny["config"], tiny["inputs"]
  with torch.no_grad():
    ref = tiny["model"].model.get_image_features(inp["pixel_values"], vision_feature_layer=cfg.vision_feature_layer,
                                                 vision_feature_select_strategy="default").pooler_output.numpy()
  ours = internvl.image_features(tiny["params"], cfg, jnp.asarray(inp["pixel_values"].numpy()))
  np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-5, rtol=1e-5)


def test_logits_and_attentions_match_transformers(tiny):
  _check_forward(tiny)


@pytest.mark.parametrize("name", [k for k in VARIANTS if k != "qwen3"])
def test_variants_match_transformers(name, tmp_path):
  _check_forward(_build(str(tmp_path), **VARIANTS[name]))


def test_greedy_32_tokens_match_transformers_generate(tiny):
  inp, cfg = tiny["inputs"], tiny["config"]
  eos = cfg.text.eos_token_id
  gen_inputs = {k: v for k, v in inp.items() if k != "position_ids"}
  with torch.no_grad():
    ref = tiny["model"].generate(**gen_inputs, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                 eos_token_id=list(eos))
  n = _np(inp)
  step = lambda ids, mask: internvl.forward(tiny["params"], cfg, ids, n["pixel_values"], attention_mask=mask)["logits"]
  ours = greedy_full_forward(step, n["input_ids"], n["attention_mask"], 32, eos)
  np.testing.assert_array_equal(ours, ref[:, n["input_ids"].shape[1]:].numpy())


def test_bad_inputs_are_clear_errors(tiny):
  n, cfg = _np(tiny["inputs"]), tiny["config"]
  with pytest.raises(ValueError, match=r"image tokens .* but 5 tile\(s\)"):
    internvl.forward(tiny["params"], cfg, n["input_ids"], n["pixel_values"][:-3], attention_mask=n["attention_mask"])
  with pytest.raises(ValueError, match="InternViT takes tiles"):
    internvl.forward(tiny["params"], cfg, n["input_ids"], n["pixel_values"][..., :16, :16],
                     attention_mask=n["attention_mask"])
  proc = load_processor(tiny["path"])
  with pytest.raises(ValueError, match="video inputs are not supported"):
    proc(text=["x"], videos=[np.zeros((2, 8, 8, 3), np.uint8)])
