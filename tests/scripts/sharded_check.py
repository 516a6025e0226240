"""Run in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8 (see tests/test_sharding.py).

Loads a tiny checkpoint on one device and tensor-parallel on a (2, 4) (data, model) mesh and prints, as JSON,
how far the sharded results are from the single-device ones (logits, greedy/AIR tokens and scores, head_gate).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import air_jax  # noqa: E402
from air_jax.sharding import make_mesh  # noqa: E402
from models import llava  # noqa: E402
from models.spec import RectificationSpec  # noqa: E402
from tests.tiny import random_images_sized  # noqa: E402


def main(path: str) -> dict:
  out = {"devices": len(jax.devices())}
  single = air_jax.load_pretrained(path)
  mesh = make_mesh(model=4, data=2)
  sharded = air_jax.load_pretrained(path, mesh=mesh)
  q = sharded.params["language_model"]["layers"]["self_attn"]["q_proj"]["weight"]
  o = sharded.params["language_model"]["layers"]["self_attn"]["o_proj"]["weight"]
  fc1 = sharded.params["vision_tower"]["encoder"]["layers"]["mlp"]["fc1"]["weight"]
  out["q_spec"] = [str(a) for a in q.sharding.spec]
  out["q_shard"] = list(q.addressable_shards[0].data.shape)
  out["q_shape"] = list(q.shape)
  out["o_shard"] = list(o.addressable_shards[0].data.shape)
  out["fc1_shard"] = list(fc1.addressable_shards[0].data.shape)
  images = random_images_sized([(40, 100), (90, 30), (64, 64), (30, 30)], seed=7)
  prompts = ["Please describe this image in detail.", "What is in the picture?", "Hi", "What?"]
  ids, mask, vision = air_jax.generate_inputs(single, images, prompts, bucket=0)
  nl, nh = single.config.dims.num_hidden_layers, single.config.dims.num_attention_heads
  gate = np.ones((nl, nh), np.float32)
  gate[0, 1] = gate[1, 5] = gate[1, 6] = 0.0

  def logits(model, spec):
    fwd = jax.jit(lambda p, v, s: llava.forward(p, model.config, ids, v, attention_mask=mask, spec=s)["logits"])
    return np.asarray(fwd(model.params, vision, spec))

  valid = mask.astype(bool)
  for name, spec in (("plain", None), ("head_gate", RectificationSpec(head_gate=jnp.asarray(gate)))):
    a, b = logits(single, spec), logits(sharded, spec)
    out[f"logits_{name}_maxdiff"] = float(np.abs(a - b)[valid].max())
  plain = logits(single, None)
  out["head_gate_effect"] = float(np.abs(logits(single, RectificationSpec(head_gate=jnp.asarray(gate))) - plain)[valid].max())
  air = air_jax.AIRConfig.preset("air_star", heads="all", qk_rescale=True, adhh_threshold=0.2)
  for name, cfg in (("greedy", None), ("air_star", air)):
    a = air_jax.generate(single, cfg, images, prompts, max_new_tokens=16, output_scores=True,
                         devices=[jax.devices()[0]])
    b = air_jax.generate(sharded, cfg, images, prompts, max_new_tokens=16, output_scores=True)
    out[f"{name}_tokens_equal"] = bool(np.array_equal(a.token_ids, b.token_ids))
    out[f"{name}_scores_maxdiff"] = float(np.abs(a.scores - b.scores).max())
    out[f"{name}_tokens"] = a.token_ids.tolist()
  # The batch is padded to the mesh's data axis (2), not to the device count (8): 3 examples run as 4 rows, and a
  # method whose rows see each other (DoLa's batch JSD) runs a batch of 2 without filler rows.
  gen = sys.modules["air_jax.generate"]
  rows, prepare = [], gen._prepare
  gen._prepare = lambda *a, **k: (lambda r: rows.append(r[0].shape[0]) or r)(prepare(*a, **k))
  air_jax.generate(sharded, None, images[:3], prompts[:3], max_new_tokens=2)
  out["rows_for_3_examples"] = rows[-1]
  dola = air_jax.methods.make("dola", batch_js=True)
  a = air_jax.generate(single, dola, images[:2], prompts[:2], max_new_tokens=8, devices=[jax.devices()[0]])
  b = air_jax.generate(sharded, dola, images[:2], prompts[:2], max_new_tokens=8)
  out["dola_batch_js_tokens_equal"] = bool(np.array_equal(a.token_ids, b.token_ids))
  return out


if __name__ == "__main__":
  print("RESULT " + json.dumps(main(sys.argv[1])))
