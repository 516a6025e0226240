"""The mid-size random LLaVA shared by the benchmarks, built once in transformers and loaded by air-jax.

CLIP 224 px / patch 14 (256 image tokens), 4 layers, width 256; Llama width 1024, MLP 2816, 8 layers, 16 heads,
vocab 32064; float32. Prompt: ~8 system tokens, 256 image tokens, ~32 text tokens.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time

import numpy as np

IMAGE_TOKEN = 32000


def build(path: str | None = None, seed: int = 0):
  """Returns (torch model, our LoadedModel without processor, input_ids [1, T], pixel_values [1, 3, 224, 224])."""
  import torch
  from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

  import air_jax

  torch.manual_seed(seed)
  vc = CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                        image_size=224, patch_size=14, projection_dim=256)
  tc = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                   num_key_value_heads=16, vocab_size=32064, max_position_embeddings=4096)
  cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_index=IMAGE_TOKEN, image_seq_length=256)
  model = LlavaForConditionalGeneration(cfg).eval()
  model.config._attn_implementation = "eager"
  path = path or tempfile.mkdtemp(prefix="air_bench_")
  model.save_pretrained(path)
  ours = air_jax.load_pretrained(path, with_processor=False)
  rng = np.random.default_rng(seed)
  ids = np.concatenate([[1], rng.integers(3, 31000, 7), [IMAGE_TOKEN] * 256, rng.integers(3, 31000, 32)])
  pixels = rng.standard_normal((1, 3, 224, 224)).astype(np.float32)
  return model, ours, ids[None].astype(np.int32), pixels


def machine() -> str:
  return f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.python_version()}"


def read_bandwidth_gbs(mb: int = 1024, repeats: int = 10) -> float:
  """Measured memory read bandwidth (GB/s): a jitted sum over a large float32 array, best of `repeats`."""
  import jax
  import jax.numpy as jnp

  x = jnp.ones((mb * 1024 * 1024 // 4,), jnp.float32)
  f = jax.jit(lambda a: jnp.sum(a))
  f(x).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    f(x).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return x.nbytes / best / 1e9


def peak_gemm_gflops(repeats: int = 8) -> float:
  """This machine's float32 matrix-product rate (GFLOP/s): the best over `repeats` runs of jitted products of the
  shapes a prefill is made of (a few hundred rows by 1024 by 1024-4096).

  A compute-bound forward (a prefill) cannot run faster than its FLOP count at this rate: the roofline the
  benchmarks compare with.
  """
  import jax
  import jax.numpy as jnp

  f = jax.jit(lambda x, y: x @ y)
  best = 0.0
  for m, k, n in ((296, 1024, 4096), (512, 1024, 4096), (1024, 1024, 1024)):
    a, b = jnp.ones((m, k), jnp.float32), jnp.ones((k, n), jnp.float32)
    f(a, b).block_until_ready()
    for _ in range(repeats):
      t = time.perf_counter()
      f(a, b).block_until_ready()
      best = max(best, 2 * m * k * n / (time.perf_counter() - t) / 1e9)
  return best


def matmul_gflop(fn, *args) -> float:
  """The matrix-product work (GFLOP, 2 m n k per product; convolutions alike) of `fn(*args)`, counted on its
  jaxpr, nested calls and scans included (XLA's own cost analysis misses the bodies of nested jitted calls).

  Element-wise work is left out, so this is a lower bound of what a forward must compute.
  """
  import jax

  return jaxpr_matmul_gflop(jax.make_jaxpr(fn)(*args).jaxpr)


def jaxpr_matmul_gflop(jaxpr) -> float:
  """`matmul_gflop` of a jaxpr (e.g. `jitted.trace(*args).jaxpr`). A while loop's body counts once (its trip
  count is not static), so the count stays a lower bound."""
  import math

  from jax.extend import core as jcore

  def count(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
      name = eqn.primitive.name
      if name == "dot_general":
        (lc, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lc)
      elif name == "conv_general_dilated":
        rhs = eqn.invars[1].aval.shape  # the kernel: every output element is in_channels/groups x spatial MACs
        spec = eqn.params["dimension_numbers"].rhs_spec
        per_out = math.prod(rhs) // rhs[spec[0]]
        total += 2 * math.prod(eqn.outvars[0].aval.shape) * per_out
      subs = [v for v in eqn.params.values() if isinstance(v, (jcore.Jaxpr, jcore.ClosedJaxpr))]
      subs += [b for v in eqn.params.values() if isinstance(v, tuple)
               for b in v if isinstance(b, (jcore.Jaxpr, jcore.ClosedJaxpr))]
      inner = 0.0
      for sub in subs:
        inner_one = count(sub.jaxpr if isinstance(sub, jcore.ClosedJaxpr) else sub)
        inner = max(inner, inner_one) if name == "cond" else inner + inner_one
      total += inner * (eqn.params.get("length", 1) if name == "scan" else 1)
    return total

  return count(getattr(jaxpr, "jaxpr", jaxpr)) / 1e9


def table(rows: list[tuple], header: tuple) -> str:
  cols = [header] + [tuple(str(c) for c in r) for r in rows]
  w = [max(len(r[i]) for r in cols) for i in range(len(header))]
  fmt = lambda r: "| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(r)) + " |"
  sep = "|" + "|".join("-" * (x + 2) for x in w) + "|"
  return "\n".join([fmt(header), sep] + [fmt(r) for r in cols[1:]])


NEXT_PINPOINTS = [[224, 448], [448, 224], [448, 448], [672, 224], [224, 672]]


def build_next(path: str | None = None, seed: int = 0):
  """A LLaVA-NeXT-shaped mid model (the decoder and tower of `build`, anyres 224 px tiles) and a 5-tile prompt.

  A 448 x 448 image picks the 448 x 448 pinpoint: 2 x 2 tiles + the base tile, 256 + 32 * 32 + 32 = 1312 image
  tokens. Returns (torch model, our LoadedModel, input_ids [1, T], our vision dict, torch extra kwargs).
  """
  import torch
  from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

  import air_jax
  from models.llava_next import num_image_tokens, num_tiles, vision_inputs

  torch.manual_seed(seed)
  vc = CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                        image_size=224, patch_size=14, projection_dim=256)
  tc = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                   num_key_value_heads=16, vocab_size=32064, max_position_embeddings=4096)
  cfg = LlavaNextConfig(vision_config=vc, text_config=tc, image_token_index=IMAGE_TOKEN, image_seq_length=256,
                        image_grid_pinpoints=NEXT_PINPOINTS)
  model = LlavaNextForConditionalGeneration(cfg).eval()
  model.config._attn_implementation = "eager"
  path = path or tempfile.mkdtemp(prefix="air_bench_next_")
  model.save_pretrained(path)
  ours = air_jax.load_pretrained(path, with_processor=False)
  size = (448, 448)
  tiles, n_img = num_tiles(ours.config, size), num_image_tokens(ours.config, size)
  assert tiles == 5
  rng = np.random.default_rng(seed)
  ids = np.concatenate([[1], rng.integers(3, 31000, 7), [IMAGE_TOKEN] * n_img, rng.integers(3, 31000, 32)])
  pixels = rng.standard_normal((1, tiles, 3, 224, 224)).astype(np.float32)
  vision = vision_inputs(ours.config, pixels, np.asarray([size]), [1])
  extra = {"image_sizes": torch.as_tensor([size])}
  return model, ours, ids[None].astype(np.int32), vision, {"pixels": pixels, **extra}
