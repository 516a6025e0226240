"""Logits and attention parity with transformers' LlavaForConditionalGeneration (eager) over a config grid."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from models import llava
from tests.conftest import PROMPTS, hf_inputs
from tests.tiny import make_tiny_llava, random_images

GRID = {
    "gqa_default": {},
    "mha": dict(kv_heads=4),
    "feature_last_layer_full": dict(vision_feature_layer=-1, select_strategy="full"),
    "feature_layer_list": dict(vision_feature_layer=[-3, -1]),
    "rope_linear_tied": dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0},
                             tie_word_embeddings=True),
    # max_position_embeddings is 64 and prompts are ~50 tokens: dynamic scaling engages with the long prompt.
    "rope_dynamic": dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
                         image_size=56, max_positions=64),
    "rope_llama3_bias_gelu": dict(
        rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 16, "rope_theta": 10000.0},
        attention_bias=True, projector_bias=False, vision_act="gelu"),
}


@pytest.mark.parametrize("name", sorted(GRID))
def test_logits_and_attentions_match_transformers(name, tmp_path):
  import air_jax

  kwargs = GRID[name]
  model, processor = make_tiny_llava(str(tmp_path), **kwargs)
  model.config._attn_implementation = "eager"
  size = kwargs.get("image_size", 28)
  inputs = hf_inputs(processor, random_images(2, size, seed=1), PROMPTS)
  mask = inputs["attention_mask"].numpy().astype(bool)
  assert not mask[1].all(), "the batch must exercise left padding"
  with torch.no_grad():
    ref = model(**inputs, output_attentions=True)
  ours = air_jax.load_pretrained(str(tmp_path))
  assert ours.num_params() == sum(p.numel() for p in model.parameters())
  out = llava.forward(ours.params, ours.config, inputs["input_ids"].numpy(), jnp.asarray(inputs["pixel_values"]),
                      attention_mask=inputs["attention_mask"].numpy(), output_attentions=True)
  logits, ref_logits = np.asarray(out["logits"]), ref.logits.numpy()
  np.testing.assert_allclose(logits[mask], ref_logits[mask], atol=1e-5, rtol=1e-5)
  for layer, ref_att in enumerate(ref.attentions):
    ours_att, ref_att = np.asarray(out["attentions"][layer]), ref_att.numpy()
    for b in range(2):
      v = mask[b]
      np.testing.assert_allclose(ours_att[b][:, v][:, :, v], ref_att[b][:, v][:, :, v], atol=1e-5)
