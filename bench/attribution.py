"""Head attribution speed: all heads at one scored position, air-jax (vmapped, compiled) vs a transformers loop.

Usage: python -m bench.attribution [--chunk 256] [--torch-full-heads 16] [--layout per_layer|stacked]
                                   [--family llava|qwen2_5_vl] [--plain]

current_token: ours = one clean forward of the sequence (kept per layer) + every head's ablation from its own
layer up (air_jax.attribution_reuse); transformers = the official mechanism: a clean cached prefix, then one
cached decode step per head with an o_proj forward pre-hook zeroing the head's slice. full_sequence: ours =
the clean run reused below each ablated layer; transformers = a full re-forward per head with the hook (timed
on a few heads and extrapolated). Both sides also compute the clean probability. Compile time is reported separately.
--family qwen2_5_vl runs the Qwen2.5-VL-shaped mid model of bench.decode_qwen (multimodal RoPE, GQA, qkv biases);
--plain adds our whole-model ablation path (`reuse=False`, what families without clean-run reuse run).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import build, jaxpr_matmul_gflop, machine, matmul_gflop, peak_gemm_gflops, table


def zero_head_hook(head: int, head_dim: int):
  """An o_proj forward pre-hook zeroing one head's slice of its input (the official ablation)."""

  def hook(module, args):
    x = args[0].clone()
    x[..., head * head_dim:(head + 1) * head_dim] = 0
    return (x,)

  return hook


def _cut(vision_kw: dict, n: int) -> dict:
  """The torch vision arguments for the first n tokens (per-token arrays such as mm_token_type_ids cut to n)."""
  return {k: (v[:, :n] if k == "mm_token_type_ids" else v) for k, v in vision_kw.items()}


def torch_current_token(model, ids, vision_kw: dict, p: int, heads: list[tuple[int, int]]):
  """Seconds for the prefix + clean step + one hooked cached step per head; and the ablated probabilities.

  vision_kw: the torch model's vision arguments (pixel_values; for Qwen2.5-VL also image_grid_thw and
  mm_token_type_ids, without which transformers 5 falls back to 1-D positions).
  """
  import torch

  torch.set_num_threads(2)
  layers = model.model.language_model.layers
  d = model.config.text_config.hidden_size // model.config.text_config.num_attention_heads
  input_ids = torch.as_tensor(ids, dtype=torch.long)
  probs = []
  with torch.no_grad():
    t0 = time.perf_counter()
    past = model(input_ids=input_ids[:, :p - 1], use_cache=True, **_cut(vision_kw, p - 1)).past_key_values
    prefix_s = time.perf_counter() - t0

    def step():
      out = model(input_ids=input_ids[:, p - 1:p], past_key_values=past, use_cache=True)
      past.crop(-1)  # the step appended one slot: drop it, back to the clean prefix
      return torch.softmax(out.logits[0, -1].double(), -1)[int(ids[0, p])].item()

    clean = step()
    for layer, head in heads:
      handle = layers[layer].self_attn.o_proj.register_forward_pre_hook(zero_head_hook(head, d))
      try:
        probs.append(step())
      finally:
        handle.remove()
    elapsed = time.perf_counter() - t0
  return elapsed, prefix_s, clean, np.array(probs)


def ours_prefill_s(loaded, ids, pixels, p: int, layout: str, repeats: int = 2) -> tuple[float, float]:
  """(seconds, matrix-product GFLOP) of our clean run as head_logprobs runs it (cut after p, padded to a bucket
  of 32; the last layer at the scored row only) with the clean log-probability."""
  from air_jax.attribution_reuse import _target_logprob, clean_run
  from models.llama import unstack_layers

  params = loaded.params
  if layout == "per_layer":
    params = dict(params, language_model=unstack_layers(params["language_model"]))
  length = -(-p // 32) * 32
  seq = np.zeros((1, length), np.int32)
  seq[0, : min(length, ids.shape[1])] = ids[0, :length]
  rows, tgt = jnp.array([p - 1], jnp.int32), jnp.array([int(ids[0, p])], jnp.int32)

  @jax.jit
  def run(params, seq, pixels):
    _, hidden, _, _ = clean_run(params, loaded.config, seq, pixels, rows)
    return _target_logprob(params["language_model"], params.get("lm_head"), hidden, tgt)

  args = (params, jnp.asarray(seq), jax.tree.map(jnp.asarray, pixels))
  jax.block_until_ready(run(*args))
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(run(*args))
    best = min(best, time.perf_counter() - t)
  return best, matmul_gflop(run, *args)


def torch_full_sequence(model, ids, vision_kw: dict, p: int, heads: list[tuple[int, int]]):
  import torch

  torch.set_num_threads(2)
  layers = model.model.language_model.layers
  d = model.config.text_config.hidden_size // model.config.text_config.num_attention_heads
  input_ids = torch.as_tensor(ids[:, :p], dtype=torch.long)
  probs = []
  with torch.no_grad():
    t0 = time.perf_counter()
    for layer, head in heads:
      handle = layers[layer].self_attn.o_proj.register_forward_pre_hook(zero_head_hook(head, d))
      try:
        logits = model(input_ids=input_ids, **_cut(vision_kw, p)).logits
        probs.append(torch.softmax(logits[0, -1].double(), -1)[int(ids[0, p])].item())
      finally:
        handle.remove()
    elapsed = time.perf_counter() - t0
  return elapsed, np.array(probs)


def ours(loaded, ids, pixels, p: int, semantics: str, chunk: int, layout: str, repeats: int = 2, reuse: bool = True,
         count_flops: bool = False):
  """(compile s, best steady call s, ablated probabilities [L, H], clean probability, matrix-product GFLOP or None
  without `count_flops`)."""
  from air_jax.attribution_core import head_logprobs
  from models.llama import unstack_layers

  params = loaded.params
  if layout == "per_layer":
    params = dict(params, language_model=unstack_layers(params["language_model"]))
  run = lambda **kw: head_logprobs(params, loaded.config, ids[0], pixels, [p], semantics=semantics, chunk=chunk,
                                   reuse=reuse, **kw)
  t = time.perf_counter()
  run(lower=True).compile()
  compile_s = time.perf_counter() - t
  clean, abl = run()  # warm-up (the jit cache compiles once more)
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    clean, abl = run()
    best = min(best, time.perf_counter() - t)
  gflop = jaxpr_matmul_gflop(run(lower="trace").jaxpr) if count_flops else None
  return compile_s, best, np.exp(abl[0]), float(np.exp(clean[0])), gflop


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--chunk", type=int, default=256)
  ap.add_argument("--torch-full-heads", type=int, default=16, help="heads timed for the transformers full re-forward")
  ap.add_argument("--layout", choices=("stacked", "per_layer"), default="per_layer",
                  help="per_layer: what Attributor uses on CPU")
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--semantics", default="current_token,full_sequence", help="comma separated")
  ap.add_argument("--family", choices=("llava", "qwen2_5_vl"), default="llava")
  ap.add_argument("--plain", action="store_true", help="also time our whole-model ablation path (reuse=False)")
  args = ap.parse_args(argv)
  import torch

  if args.family == "qwen2_5_vl":
    from bench import decode_qwen
    from models import qwen2_5_vl

    model, loaded, ids, raw, grid = decode_qwen.build()
    pixels = qwen2_5_vl.vision_inputs(loaded.config, raw, grid, [1])
    vision_kw = {"pixel_values": torch.as_tensor(raw), "image_grid_thw": torch.as_tensor(grid),
                 "mm_token_type_ids": torch.as_tensor((ids == decode_qwen.IMAGE).astype(np.int64))}
  else:
    model, loaded, ids, pixels = build()
    vision_kw = {"pixel_values": torch.as_tensor(pixels)}
  cfg = loaded.config.text
  nl, nh = cfg.num_hidden_layers, cfg.num_attention_heads
  heads = [(l, h) for l in range(nl) for h in range(nh)]
  p = ids.shape[1] - 1  # score the last token given everything before it
  print(f"machine: {machine()}; jax {jax.__version__} on {jax.devices()[0].platform}; {nl} x {nh} heads, "
        f"sequence {ids.shape[1]} tokens (256 image), scored slot {p}, float32, chunk {args.chunk}, "
        f"layout {args.layout}, family {args.family}")
  rows = []
  todo = args.semantics.split(",")
  c_ours = c_torch = None
  if "current_token" in todo:
    t_compile, t_ours, p_ours, c_ours, gflop = ours(loaded, ids, pixels, p, "current_token", args.chunk,
                                                    args.layout, args.repeats, count_flops=True)
    t_torch, pre_torch, c_torch, p_torch = torch_current_token(model, ids, vision_kw, p, heads)
    pre_ours, pre_gflop = ours_prefill_s(loaded, ids, pixels, p, args.layout, args.repeats)
    err = float(np.abs(np.log(p_ours.reshape(-1)) - np.log(p_torch)).max())
    rows.append(("current_token", f"{t_ours:.2f}", f"{t_compile:.1f}", f"{t_torch:.2f}",
                 f"{t_torch / t_ours:.1f}x", f"{err:.1e}"))
    abl_ours, abl_torch = t_ours - pre_ours, t_torch - pre_torch
    rows.append(("  of which: clean prefix", f"{pre_ours:.2f}", "-", f"{pre_torch:.2f}",
                 f"{pre_torch / pre_ours:.1f}x", "-"))
    rows.append(("  of which: 1 + L*H ablated steps", f"{abl_ours:.2f}", "-", f"{abl_torch:.2f}",
                 f"{abl_torch / abl_ours:.1f}x", "-"))
    if args.plain:
      c_plain, t_plain, p_plain, _, _ = ours(loaded, ids, pixels, p, "current_token", args.chunk, args.layout,
                                             args.repeats, reuse=False)
      err_p = float(np.abs(np.log(p_plain.reshape(-1)) - np.log(p_torch)).max())
      rows.append(("current_token, plain path", f"{t_plain:.2f}", f"{c_plain:.1f}", f"{t_torch:.2f}",
                   f"{t_torch / t_plain:.1f}x", f"{err_p:.1e}"))
  if "full_sequence" in todo:
    k = min(args.torch_full_heads, len(heads))
    t_compile, t_ours_f, p_ours_f, _, _ = ours(loaded, ids, pixels, p, "full_sequence", args.chunk, args.layout,
                                             args.repeats)
    t_torch_k, p_torch_f = torch_full_sequence(model, ids, vision_kw, p, heads[:k])
    t_torch_f = t_torch_k / k * (len(heads) + 1)  # + the clean forward
    err_f = float(np.abs(np.log(p_ours_f.reshape(-1)[:k]) - np.log(p_torch_f)).max())
    rows.append(("full_sequence", f"{t_ours_f:.2f}", f"{t_compile:.1f}",
                 f"{t_torch_f:.2f} ({k} heads timed)", f"{t_torch_f / t_ours_f:.1f}x", f"{err_f:.1e}"))
    if args.plain:
      c_plain, t_plain, p_plain, _, _ = ours(loaded, ids, pixels, p, "full_sequence", args.chunk, args.layout,
                                             args.repeats, reuse=False)
      rows.append(("full_sequence, plain path", f"{t_plain:.2f}", f"{c_plain:.1f}",
                   f"{t_torch_f:.2f} ({k} heads timed)", f"{t_torch_f / t_plain:.1f}x",
                   f"{float(np.abs(np.log(p_plain.reshape(-1)[:k]) - np.log(p_torch_f)).max()):.1e}"))
  print(table(rows, ("semantics", "air-jax s", "compile s", "transformers s", "speed-up", "max |log P diff|")))
  if c_ours is not None:
    print(f"clean probability of the scored token: ours {c_ours:.3e}, transformers {c_torch:.3e}")
    # The roofline of current_token: the clean prefix (a compute-bound forward both sides must run) and the
    # ablated rows cannot run faster than their matrix products at this machine's rate.
    peak = peak_gemm_gflops()
    floor_pre, floor = pre_gflop / peak, gflop / peak
    print(f"roofline: this machine multiplies float32 matrices at {peak:.0f} GFLOP/s (measured now). The clean "
          f"prefix is {pre_gflop:.1f} GFLOP of matrix products (at least {floor_pre:.2f} s; ours {pre_ours:.2f} s), "
          f"the whole current_token computation {gflop:.1f} GFLOP (at least {floor:.2f} s; ours {t_ours:.2f} s): "
          f"no implementation can beat the transformers loop by more than {t_torch / floor:.1f}x here "
          f"({t_torch / floor_pre:.1f}x even with free ablations)")


if __name__ == "__main__":
  main()
