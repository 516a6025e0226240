"""A whole CHAIR-style captioning run, end to end: air-jax vs the official AIR pipeline re-created in transformers.

Usage: python -m bench.eval_run [--images 64] [--max-new-tokens 64] [--batch 16] [--torch-batch 4]

Both sides caption the same images (random preprocessed 224 px pixels, the mid-size random LLaVA of
bench/common.py, the same 296-token prompt) greedily with no EOS, so both produce exactly max_new_tokens per
image and the token ids must agree. Wall time includes everything after the model is in memory: compilation on
our side, the Python loop on theirs.

  ours: batches of --batch through the compiled generation (`decoding.generate_tokens_jit`, one
    compilation for the run: the last batch is padded), each caption appended to a JSONL as it is produced and
    a rerun resumes (as `eval.chair` does).
  official: eager attention, `generate(..., output_attentions=True, return_dict_in_generate=True)` as the
    official AIR code forces it (attention weights of every layer and step are materialised and returned),
    batches of 4, one loop over the images.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import build, matmul_gflop, machine, peak_gemm_gflops, table


def ours_run(loaded, ids, pixels, n_new: int, batch: int, out: Path):
  """(seconds, tokens [N, n_new]); captions (token ids) appended to `out`, images already there skipped."""
  from air_jax import decoding
  from eval.captions_io import CaptionsWriter, read_jsonl_records
  from models.llama import unstack_layers

  t0 = time.perf_counter()
  done = {r.image_id for r in read_jsonl_records(out)} if out.exists() else set()
  writer = CaptionsWriter(out)
  params = dict(loaded.params, language_model=unstack_layers(loaded.params["language_model"]))  # CPU layout
  sv = decoding.SamplingValues.make(0)
  todo = [i for i in range(pixels.shape[0]) if i not in done]
  for start in range(0, len(todo), batch):
    idx = todo[start:start + batch]
    rows = idx + [idx[0]] * (batch - len(idx))  # padding rows, dropped below
    b_ids = jnp.asarray(np.repeat(ids, batch, 0))
    toks = decoding.generate_tokens_jit(params, loaded.config, b_ids, jnp.ones_like(b_ids),
                                        jnp.asarray(pixels[rows]), None, sv, max_new_tokens=n_new, eos_ids=(),
                                        pad_id=0)["tokens"]
    toks = np.asarray(toks)
    for k, i in enumerate(idx):
      writer.write({"image_id": i, "caption": " ".join(map(str, toks[k].tolist()))})
  elapsed = time.perf_counter() - t0
  recs = sorted(read_jsonl_records(out), key=lambda r: r.image_id)
  return elapsed, np.array([[int(t) for t in r.caption.split()] for r in recs])


def prefill_gflop(loaded, ids, pixels, n_new: int) -> float:
  """The matrix-product GFLOP of one image's prefill (vision tower, projector, the prompt through the decoder)."""
  from air_jax import decoding
  from models.llama import unstack_layers

  params = dict(loaded.params, language_model=unstack_layers(loaded.params["language_model"]))
  b_ids = jnp.asarray(ids)
  fn = lambda p, i, px: decoding.prefill(p, loaded.config, i, jnp.ones_like(i), px, None, i.shape[1] + n_new)[0]
  return matmul_gflop(fn, params, b_ids, jnp.asarray(pixels[:1]))


def official_run(model, ids, pixels, n_new: int, batch: int):
  """(seconds, tokens [N, n_new]): the official loop (batches of `batch`, output_attentions=True)."""
  import torch

  torch.set_num_threads(2)
  model.generation_config.eos_token_id = None  # no EOS: exactly n_new tokens, like ours
  model.generation_config.pad_token_id = 0
  out = []
  t0 = time.perf_counter()
  with torch.no_grad():
    for start in range(0, pixels.shape[0], batch):
      pv = torch.as_tensor(pixels[start:start + batch])
      b = pv.shape[0]
      input_ids = torch.as_tensor(np.repeat(ids, b, 0), dtype=torch.long)
      res = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pv,
                           max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, output_attentions=True,
                           return_dict_in_generate=True)
      out.append(res.sequences[:, input_ids.shape[1]:].numpy())
  return time.perf_counter() - t0, np.concatenate(out)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--images", type=int, default=64)
  ap.add_argument("--max-new-tokens", type=int, default=64)
  ap.add_argument("--batch", type=int, default=16, help="our batch size")
  ap.add_argument("--torch-batch", type=int, default=4, help="the official pipeline's batch size")
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args(argv)
  model, loaded, ids, _ = build()
  rng = np.random.default_rng(args.seed)
  pixels = rng.standard_normal((args.images, 3, 224, 224)).astype(np.float32)
  print(f"machine: {machine()}; jax {jax.__version__}; {args.images} images, {args.max_new_tokens} new tokens "
        f"(greedy, no EOS), prompt {ids.shape[1]} tokens, float32; ours batch {args.batch}, "
        f"official batch {args.torch_batch}")
  with tempfile.TemporaryDirectory() as d:
    t_ours, tok_ours = ours_run(loaded, ids, pixels, args.max_new_tokens, args.batch, Path(d) / "captions.jsonl")
  t_off, tok_off = official_run(model, ids, pixels, args.max_new_tokens, args.torch_batch)
  same = int((tok_ours == tok_off).all(axis=1).sum())
  n = args.images
  rows = [("official (transformers eager, output_attentions, batch 4)", f"{t_off:.1f}", f"{n / t_off:.2f}", "1.0x"),
          (f"air-jax (compiled, batch {args.batch}, incl. compilation)", f"{t_ours:.1f}", f"{n / t_ours:.2f}",
           f"{t_off / t_ours:.1f}x")]
  print(table(rows, ("pipeline", "wall s", "captions/s", "speed-up")))
  print(f"identical token sequences: {same} / {n}")
  # The roofline: every image's prefill is a compute-bound forward that both pipelines must run.
  gflop, peak = prefill_gflop(loaded, ids, pixels, args.max_new_tokens) * n, peak_gemm_gflops()
  floor = gflop / peak
  print(f"roofline: the {n} prefills are {gflop:.0f} GFLOP (their matrix products); this machine multiplies "
        f"float32 matrices at {peak:.0f} GFLOP/s (measured now), so they need at least {floor:.1f} s and any "
        f"pipeline can be at most {t_off / floor:.1f}x the official one here")
  print(json.dumps({"ours_s": t_ours, "official_s": t_off, "speedup": t_off / t_ours, "identical": same,
                    "prefill_gflop": gflop, "peak_gflops": peak, "max_speedup_on_this_machine": t_off / floor}))


if __name__ == "__main__":
  main()
