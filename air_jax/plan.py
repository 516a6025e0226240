"""Memory plan of a sharded model: `python -m air_jax.plan --model DIR --devices N --dtype bfloat16`.

Reads only `config.json` (no weights needed), builds the abstract params and traces the prefill with
`jax.eval_shape` (so the plan uses the same shapes as the real run), splits every tensor as the family's
tensor-parallel rules would on a (data, model) mesh (`air_jax.sharding`), and prints per-device memory:

  params     exact: every param's per-device shard
  kv cache   exact: the prefill's cache for batch x (prompt + new tokens), batch over data, KV heads over model
  workspace  estimate of the prefill peak: one layer's attention scores + probabilities + one edited copy
             (float32, heads over model), its MLP activations, the residual stream, the vision tower's
             attention of all tiles, and the float32 logits of the last row
and whether the total fits `--device-memory` GB with `--headroom` (default 10 %) left for the runtime.
On CPU, `generate` also keeps one buffer per decoder layer (a second copy of the decoder weights); that
layout is not used on GPU/TPU and is not counted here.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from air_jax.loading import load_config, resolve_dtype
from air_jax.sharding import DATA, MODEL, path_names, per_device_bytes, spec_for
from models.params import is_shape

GB = 1e9


@dataclasses.dataclass
class Plan:
  """Per-device bytes of a model on a (data, model) mesh."""

  devices: int
  data: int
  model: int
  dtype: str
  batch: int
  prompt_tokens: int
  new_tokens: int
  num_params: int
  params: int
  kv_cache: int
  workspace: int
  device_memory: float | None
  headroom: float
  replicated_note: str = ""

  @property
  def total(self) -> int:
    return self.params + self.kv_cache + self.workspace

  @property
  def fits(self) -> bool | None:
    if self.device_memory is None:
      return None
    return self.total <= self.device_memory * GB * (1.0 - self.headroom)

  def table(self) -> str:
    rows = [("params", self.params), ("kv cache", self.kv_cache), ("workspace (estimate)", self.workspace),
            ("total", self.total)]
    lines = [f"mesh (data={self.data}, model={self.model}) over {self.devices} devices, {self.dtype}, "
             f"{self.num_params / 1e9:.2f} B params; batch {self.batch}, {self.prompt_tokens} prompt + "
             f"{self.new_tokens} new tokens"] + ([self.replicated_note] if self.replicated_note else []) + ["per device:"]
    lines += [f"  {name:<22}{b / GB:9.2f} GB" for name, b in rows]
    if self.device_memory is not None:
      budget = self.device_memory * (1.0 - self.headroom)
      verdict = "FITS" if self.fits else "DOES NOT FIT"
      lines.append(f"  {verdict} in {self.device_memory:g} GB per device ({budget:.1f} GB usable with "
                   f"{self.headroom:.0%} headroom)")
    return "\n".join(lines)


def plan(path: str, devices: int, dtype="bfloat16", *, model_parallel: int | None = None, batch: int = 1,
         prompt_tokens: int | None = None, new_tokens: int = 512, device_memory: float | None = None,
         headroom: float = 0.1) -> Plan:
  """The per-device memory plan of the checkpoint (or config-only directory) at `path`."""
  config, fam = load_config(path)
  dt = jnp.dtype(resolve_dtype(dtype))
  if devices < 1:
    raise ValueError(f"--devices must be at least 1, got {devices}")
  mp = devices if model_parallel is None else model_parallel
  if mp < 1 or devices % mp:
    raise ValueError(f"--model-parallel {mp} must divide --devices {devices}")
  dp = devices // mp
  mesh_shape = {DATA: dp, MODEL: mp}
  shapes = fam.param_shapes(config)
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dt), shapes, is_leaf=is_shape)
  rules = fam.partition_rules(config)
  num_params, param_bytes = 0, 0
  for kp, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    parts = path_names(kp)
    num_params += int(np.prod(leaf.shape))
    param_bytes += per_device_bytes(leaf.shape, dt.itemsize, spec_for(rules, parts, leaf.shape, mp), mesh_shape)
  d = config.dims
  t = prompt_tokens if prompt_tokens is not None else fam.max_image_tokens(config) + 64
  b = -(-max(batch, 1) // dp) * dp  # generate pads the batch to a multiple of the data axis
  s = t + new_tokens

  # The cache exactly as prefill creates it (text-only prompt of the same length: same cache shapes).
  from air_jax import decoding

  ids = jax.ShapeDtypeStruct((b, t), jnp.int32)
  _, state, _ = jax.eval_shape(lambda p, i: decoding.prefill(p, config, i, jnp.ones(i.shape, jnp.int32), None, None,
                                                             s), abstract, ids)
  kv_bytes = 0
  view, batch_axes, _ = fam.cache_view(config, state.cache)
  for leaf, ax in zip(jax.tree.leaves(view), jax.tree.leaves(batch_axes)):
    # e.g. [L, B, S, K, D] (Llama, stacked): batch over data; the KV-head axis over model when divisible.
    spec = [None] * leaf.ndim
    if b % dp == 0:
      spec[ax] = DATA
    heads = [i for i, n in enumerate(leaf.shape) if n == d.num_key_value_heads and i != ax]
    if heads and d.num_key_value_heads % mp == 0:
      spec[heads[-1]] = MODEL
    kv_bytes += per_device_bytes(leaf.shape, leaf.dtype.itemsize, PartitionSpec(*spec), mesh_shape)

  bl = math.ceil(b / dp)
  heads = math.ceil(d.num_attention_heads / mp)
  inter = getattr(getattr(config, "text", None), "intermediate_size", 4 * d.hidden_size)
  work = 3 * bl * heads * t * s * 4  # scores, probabilities, one edited copy (float32)
  work += 3 * bl * t * math.ceil(inter / mp) * dt.itemsize  # gate, up, product
  work += 4 * bl * t * d.hidden_size * dt.itemsize  # residual, normed input, attention output, q/k/v slice
  work += bl * d.vocab_size * 4
  vision = getattr(config, "vision", None)
  if vision is not None:  # vision configs differ by family: read what is there, fall back to the image tokens
    tiles = bl * fam.max_vision_tiles(config)
    n = int(getattr(vision, "num_patches", 0) or fam.max_image_tokens(config)) + 1
    v_heads = int(getattr(vision, "num_attention_heads", 1))
    v_inter = int(getattr(vision, "intermediate_size", 4 * getattr(vision, "hidden_size", d.hidden_size)))
    work += 2 * tiles * math.ceil(v_heads / mp) * n * n * 4
    work += 4 * tiles * n * v_inter * dt.itemsize // mp
  return Plan(devices=devices, data=dp, model=mp, dtype=str(dt), batch=b, prompt_tokens=t, new_tokens=new_tokens,
              num_params=num_params, params=param_bytes, kv_cache=kv_bytes, workspace=work,
              device_memory=device_memory, headroom=headroom,
              replicated_note=_replicated_note(fam, rules, mp, num_params * dt.itemsize, param_bytes))


def _replicated_note(fam, rules, mp: int, all_bytes: int, per_device: int) -> str:
  """A note when the model axis splits (almost) nothing: no rules, or a size that divides no tensor dimension."""
  if mp == 1:
    return ""
  if not rules:
    return (f"note: the {fam.name} family has no tensor-parallel rules (Family.partition_rules): every device holds "
            "all params")
  # An even split holds 1 / mp of them (plus the small tensors kept whole); note a share nearer to all than to that.
  if per_device > 0.5 * (1.0 + 1.0 / mp) * all_bytes:
    return (f"note: --model-parallel {mp} divides few of the tensors' head / width dimensions, so "
            f"{per_device / all_bytes:.0%} of the params stay on every device; choose a model-parallel size that "
            "divides the number of heads and the widths")
  return ""


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m air_jax.plan", description=__doc__.split("\n\n")[0])
  p.add_argument("--model", required=True, help="checkpoint directory (config.json is enough) or Hugging Face "
                                                 "repository id (only its JSON configs are fetched)")
  p.add_argument("--devices", type=int, required=True, help="number of devices")
  p.add_argument("--dtype", default="bfloat16", help="float32 | bfloat16 | float16")
  p.add_argument("--model-parallel", type=int, default=None, help="size of the model axis (default: --devices)")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--prompt-tokens", type=int, default=None, help="default: the largest image's tokens + 64")
  p.add_argument("--new-tokens", type=int, default=512)
  p.add_argument("--device-memory", type=float, default=None, help="GB per device, to say whether it fits")
  p.add_argument("--headroom", type=float, default=0.1, help="fraction of device memory kept free")
  a = p.parse_args(argv)
  try:
    result = plan(a.model, a.devices, a.dtype, model_parallel=a.model_parallel, batch=a.batch,
                  prompt_tokens=a.prompt_tokens, new_tokens=a.new_tokens, device_memory=a.device_memory,
                  headroom=a.headroom)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(result.table())
  return 0 if result.fits in (None, True) else 1


if __name__ == "__main__":
  sys.exit(main())
