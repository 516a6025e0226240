"""Decode speed on a Qwen2.5-VL-shaped mid model: air-jax vs transformers (torch, 2 threads), one run.

Usage: python -m bench.decode_qwen [--new-tokens 32] [--methods greedy,air] [--rounds 5]
Model (random, float32): window-attention ViT (patch 14, 8 blocks of width 640, full attention at 3 and 7, window
112) + 2x2 merger; Qwen2 decoder width 1024, MLP 2816, 8 layers, 16 heads / 2 KV heads (GQA), qkv biases, M-RoPE
sections [8, 12, 12], vocab 32064. One 448 x 448 image (32 x 32 patches, 256 image tokens), 298-token prompt.
Prints prefill time, decode ms/token (best of several runs on both sides, round robin), compile time, ratios.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import numpy as np

from bench.common import machine
from bench.decode import compare

IMAGE, START, END = 32001, 32002, 32003


def build(seed: int = 0):
  """(torch model, our LoadedModel without processor, ids [1, T], pixel_values [N, 1176], grid [1, 3])."""
  import torch
  from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

  import air_jax

  torch.manual_seed(seed)
  text = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
              num_key_value_heads=2, vocab_size=32064, max_position_embeddings=4096,
              rope_parameters={"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 1000000.0})
  vision = dict(depth=8, hidden_size=640, intermediate_size=1712, num_heads=10, patch_size=14, window_size=112,
                fullatt_block_indexes=[3, 7], out_hidden_size=1024, spatial_merge_size=2, temporal_patch_size=2)
  cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=32004,
                         vision_start_token_id=START, vision_end_token_id=END)
  model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
  for mod in model.modules():
    if getattr(mod, "config", None) is not None:
      mod.config._attn_implementation = "eager"
  path = tempfile.mkdtemp(prefix="air_bench_qwen_")
  model.save_pretrained(path)
  ours = air_jax.load_pretrained(path, with_processor=False)
  rng = np.random.default_rng(seed)
  ids = np.concatenate([rng.integers(3, 31000, 8), [START], [IMAGE] * 256, [END], rng.integers(3, 31000, 32)])
  pixels = rng.standard_normal((32 * 32, 3 * 2 * 14 * 14)).astype(np.float32)
  return model, ours, ids[None].astype(np.int32), pixels, np.array([[1, 32, 32]])


def torch_decode(model, ids, pixels, grid, n: int, repeats: int = 3):
  """transformers' own KV-cached greedy loop (rope_deltas kept by the model); best of `repeats` after a warm-up."""
  import torch

  torch.set_num_threads(2)
  inputs = dict(input_ids=torch.as_tensor(ids, dtype=torch.long), pixel_values=torch.as_tensor(pixels),
                image_grid_thw=torch.as_tensor(grid), mm_token_type_ids=torch.as_tensor((ids == IMAGE).astype(int)))
  best_pre, best_dec = float("inf"), float("inf")
  cache_of = lambda out: getattr(out, "cache", None) or out.past_key_values
  with torch.no_grad():
    model(**inputs, use_cache=True)  # warm-up
    for _ in range(repeats):
      model.model.rope_deltas = None
      t0 = time.perf_counter()
      out = model(**inputs, use_cache=True)
      t1 = time.perf_counter()
      past, tok = cache_of(out), out.logits[:, -1].argmax(-1, keepdim=True)
      tokens = [int(tok)]
      for _ in range(n - 1):
        out = model(input_ids=tok, cache=past, use_cache=True)
        past, tok = cache_of(out), out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(tok))
      t2 = time.perf_counter()
      best_pre, best_dec = min(best_pre, t1 - t0), min(best_dec, (t2 - t1) / (n - 1) * 1e3)
  return {"prefill_s": best_pre, "decode_ms": best_dec, "tokens": tokens}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--new-tokens", type=int, default=32)
  ap.add_argument("--methods", default="greedy,air", help="comma separated: greedy and AIRConfig presets")
  ap.add_argument("--rounds", type=int, default=5, help="timed runs per method (best is reported)")
  args = ap.parse_args(argv)
  n = args.new_tokens
  from models import qwen2_5_vl

  model, ours, ids, pixels, grid = build()
  print(f"machine: {machine()}; jax {jax.__version__} on {jax.devices()[0].platform}; prompt {ids.shape[1]} "
        f"tokens (256 image), {n} new tokens, float32")
  ref = torch_decode(model, ids, pixels, grid, n)
  vision = qwen2_5_vl.vision_inputs(ours.config, pixels, grid, [1])
  compare(ours, ids, vision, n, args.methods.split(","), args.rounds, ref)

if __name__ == "__main__":
  main()
