"""Run in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8 (see tests/test_sharding_vl.py).

Loads a tiny Qwen2.5-VL or InternVL checkpoint on one device and tensor-parallel on a (2, 4) (data, model) mesh
and prints, as JSON, how far the sharded results are from the single-device ones (logits with and without a
head gate, greedy and AIR* tokens and scores).
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
from models import family  # noqa: E402
from models.spec import RectificationSpec  # noqa: E402
from tests.tiny_vl import random_image  # noqa: E402


def main(path: str) -> dict:
  out = {"devices": len(jax.devices())}
  single = air_jax.load_pretrained(path)
  sharded = air_jax.load_pretrained(path, mesh=make_mesh(model=4, data=2))
  q = sharded.params["language_model"]["layers"]["self_attn"]["q_proj"]["weight"]
  out["q_shard"], out["q_shape"] = list(q.addressable_shards[0].data.shape), list(q.shape)
  images = [[random_image(64, 32, 1), random_image(32, 32, 2)], random_image(48, 80, 3), random_image(40, 56, 4),
            random_image(64, 64, 5)]
  prompts = ["Please describe this image in detail.", "What is in the picture?", "Hi", "What?"]
  ids, mask, vision = air_jax.generate_inputs(single, images, prompts, bucket=0)
  d = single.config.dims
  gate = np.ones((d.num_hidden_layers, d.num_attention_heads), np.float32)
  gate[0, 1] = gate[1, 5] = gate[1, 6] = 0.0

  def logits(model, spec):
    fwd = jax.jit(lambda p, v, s: family.forward(p, model.config, ids, v, attention_mask=mask, spec=s)["logits"])
    return np.asarray(fwd(model.params, vision, spec))

  valid = mask.astype(bool)
  for name, spec in (("plain", None), ("head_gate", RectificationSpec(head_gate=jnp.asarray(gate)))):
    out[f"logits_{name}_maxdiff"] = float(np.abs(logits(single, spec) - logits(sharded, spec))[valid].max())
  air = air_jax.AIRConfig.preset("air_star", heads="all", qk_rescale=True, adhh_threshold=0.2)
  for name, cfg in (("greedy", None), ("air_star", air)):
    a = air_jax.generate(single, cfg, images, prompts, max_new_tokens=12, output_scores=True,
                         devices=[jax.devices()[0]])
    b = air_jax.generate(sharded, cfg, images, prompts, max_new_tokens=12, output_scores=True)
    out[f"{name}_tokens_equal"] = bool(np.array_equal(a.token_ids, b.token_ids))
    out[f"{name}_scores_maxdiff"] = float(np.abs(a.scores - b.scores).max())
    out[f"{name}_tokens"] = a.token_ids.tolist()
  return out


if __name__ == "__main__":
  print("RESULT " + json.dumps(main(sys.argv[1])))
