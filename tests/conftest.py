"""Shared fixtures: tiny random LLaVA checkpoints built with transformers, and HF-vs-ours input helpers."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROMPTS = ["Please describe this image in detail.", "What is in the picture?"]

# CI runs the suite as two parallel pytest processes (tools/run_tests.sh): `-m "not slow"` and `-m slow`. Besides the
# tests marked slow one by one, every test of these files runs in the second process (the model families, sharding,
# end-to-end CLIs and benchmarks' heavier checks), which balances the two halves on a 2-core machine.
SECOND_STEP_FILES = {
    "test_llava_next.py", "test_qwen2_5_vl.py", "test_internvl.py", "test_vl_e2e.py",
    "test_deepseek_vl2.py", "test_instructblip.py", "test_families_blip_dsvl2.py", "test_sharding.py",
    "test_sharding_vl.py", "test_eval_shape.py", "test_eval_shape_next.py", "test_eval_shape_vl.py",
    "test_eval_shape_blip_dsvl2.py", "test_plan.py", "test_analysis_model.py", "test_export_hf.py",
    "test_organism_model.py", "test_organism_heads.py", "test_attribution_reuse.py", "test_compile_count.py",
    "test_owl_detector.py", "test_pope.py", "test_judged_benchmarks.py", "test_llava_parity.py",
    "test_halc.py", "test_deepseek_vl2_methods.py", "test_deepseek_vl2_patch_floor.py",
}


def pytest_collection_modifyitems(config, items):
  for item in items:
    if os.path.basename(str(item.fspath)) in SECOND_STEP_FILES:
      item.add_marker(pytest.mark.slow)


def chat_texts(processor, prompts):
  msgs = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}] for p in prompts]
  return [processor.apply_chat_template(m, add_generation_prompt=True) for m in msgs]


def hf_inputs(processor, images, prompts):
  """Processor outputs (torch tensors) for a left-padded batch, plus transformers' generate-style position ids."""
  inputs = processor(images=images, text=chat_texts(processor, prompts), return_tensors="pt", padding=True)
  mask = inputs["attention_mask"]
  inputs["position_ids"] = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
  return inputs


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
  """The default tiny checkpoint (GQA, 2 text layers), saved once per session."""
  from tests.tiny import make_tiny_llava

  path = str(tmp_path_factory.mktemp("tiny_default"))
  model, processor = make_tiny_llava(path)
  return path


@pytest.fixture(scope="session")
def tiny_torch(tiny_dir):
  """The default tiny checkpoint loaded back with transformers (eager attention)."""
  from transformers import LlavaForConditionalGeneration

  model = LlavaForConditionalGeneration.from_pretrained(tiny_dir, attn_implementation="eager")
  return model.eval()


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
  import air_jax

  return air_jax.load_pretrained(tiny_dir)


def valid_rows(mask) -> np.ndarray:
  return np.asarray(mask).astype(bool)
