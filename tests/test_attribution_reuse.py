"""Prefix-reuse ablation equals the plain rerun; the gradient screen equals a finite-difference estimate."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from air_jax import decoding
from air_jax.attribution import Attributor
from air_jax.attribution_core import head_logprobs
from air_jax.attribution_screen import screen_deltas, screen_logprobs
from models import family
from models.spec import RectificationSpec
from tests.tiny import random_images


@pytest.fixture(scope="module")
def model3(tmp_path_factory):
  """A 3-layer tiny LLaVA (so some ablated layer has layers both below and above it)."""
  import air_jax
  from tests.tiny import make_tiny_llava

  path = str(tmp_path_factory.mktemp("tiny3"))
  make_tiny_llava(path, text_layers=3)
  return air_jax.load_pretrained(path)


@pytest.fixture(scope="module")
def case3(model3):
  att = Attributor(model3)
  prompt_ids, pixels = att.prompt_inputs(random_images(1, 28, seed=5)[0])
  _, ids, _ = att.caption_inputs("A cat sits on a red chair next to a dog.")
  seq = np.concatenate([prompt_ids, ids]).astype(np.int32)
  tp = len(prompt_ids)
  return seq, pixels, [tp, tp + 5, len(seq) - 2]


@pytest.mark.parametrize("semantics", ["current_token", "full_sequence"])
def test_prefix_reuse_equals_plain(model3, case3, semantics):
  seq, pixels, positions = case3
  m = model3
  ref_clean, ref_abl = head_logprobs(m.params, m.config, seq, pixels, positions, semantics=semantics, chunk=5,
                                     reuse=False)
  assert np.abs(ref_abl - ref_clean[:, None, None]).max() > 1e-2, "ablations must matter"
  # current_token: one position per group (chunk 3), four (chunk 64); full_sequence: 3 of 4 heads per call.
  for chunk in ((3, 64) if semantics == "current_token" else (3,)):
    clean, abl = head_logprobs(m.params, m.config, seq, pixels, positions, semantics=semantics, chunk=chunk)
    np.testing.assert_allclose(clean, ref_clean, atol=1e-5, rtol=0)
    np.testing.assert_allclose(abl, ref_abl, atol=1e-5, rtol=0)


def finite_difference(m, seq, pixels, positions, semantics, eps=1e-2):
  """Central difference of P in the gate of each head (the row p - 1 only, or every row), for any family:
  current_token through read-only decoding steps on the clean cache, full_sequence through the whole forward."""
  cfg = m.config
  nl, nh = cfg.dims.num_hidden_layers, cfg.dims.num_attention_heads
  ids = jnp.asarray(seq)[None]
  vision = jax.tree.map(jnp.asarray, pixels)
  t = ids.shape[1]
  if semantics == "current_token":
    _, state, _ = decoding.prefill_jit(m.params, cfg, ids, jnp.ones_like(ids), vision, None, t)
    step = jax.jit(lambda st, tok, g: jax.nn.softmax(
        decoding.decode_step(m.params, cfg, st, tok, RectificationSpec(head_gate=g))[0][0]))

    def probs(g):
      out = []
      for p in positions:  # the text slot p - 1 sits t - (p - 1) positions before the offset prefill left
        st = state.replace(write_index=jnp.int32(p - 1), next_position=state.next_position - (t - (p - 1)))
        out.append(float(step(st, jnp.asarray(seq[p - 1:p]), g)[seq[p]]))
      return np.array(out)
  else:
    fwd = jax.jit(lambda g: jax.nn.softmax(family.forward(m.params, cfg, ids, vision,
                                                          spec=RectificationSpec(head_gate=g))["logits"][0], -1))
    rows, tgt = np.asarray(positions) - 1, seq[np.asarray(positions)]
    probs = lambda g: np.asarray(fwd(g))[rows, tgt]
  fd = np.zeros((len(positions), nl, nh))
  for l in range(nl):
    for h in range(nh):
      one = jnp.ones((nl, nh))
      fd[:, l, h] = (probs(one.at[l, h].set(1 + eps)) - probs(one.at[l, h].set(1 - eps))) / (2 * eps)
  return fd


@pytest.mark.parametrize("semantics", ["current_token", "full_sequence"])
def test_screen_equals_finite_difference(model3, case3, semantics):
  seq, pixels, positions = case3
  m = model3
  clean, grad = screen_logprobs(m.params, m.config, seq, pixels, positions, semantics=semantics)
  ref_clean, _ = head_logprobs(m.params, m.config, seq, pixels, positions, semantics=semantics)
  np.testing.assert_allclose(clean, ref_clean, atol=1e-5)
  fd = finite_difference(m, seq, pixels, positions, semantics)
  assert np.abs(fd).max() > 5e-3
  np.testing.assert_allclose(grad, fd, atol=2e-5, rtol=0)
  np.testing.assert_allclose(screen_deltas(clean, grad, "logprob"), grad / np.exp(clean)[:, None, None])


def test_cli_screen_then_exact_top_k(tmp_path, tiny_dir):
  """--screen K: estimates for every head, exact ablation of the K heads with the largest |S estimate| only."""
  import json

  from eval import attribute
  from eval.chair import run as chair_run
  from tests.test_attribute_cli import CAPTIONS, FIXTURE, _args

  caps = tmp_path / "hand_captions.jsonl"
  caps.write_text("".join(json.dumps(c) + "\n" for c in CAPTIONS))
  chair_run(["--coco-root", str(FIXTURE), "--captions", str(caps), "--method", "hand", "--out", str(tmp_path),
             "--no-progress"])
  out = tmp_path / "screened"
  summary = attribute.run(_args(tmp_path / "hand_chair.json", tiny_dir, out, "--screen", "3", "--limit", "2"))
  screen = summary["screen"]
  assert screen["k"] == 3 and screen["num_samples"] == 2
  z = np.load(out / "attribution.npz")
  est = z["screen_S"].ravel()
  chosen = [l * 4 + h for l, h, _, _ in screen["heads"]]
  assert chosen == list(np.argsort(-np.abs(est), kind="stable")[:3])
  exact = z["S"].ravel()
  assert np.isfinite(exact[chosen]).all() and np.isnan(np.delete(exact, chosen)).all()
  sel = [l * 4 + h for l, h in json.loads((out / "heads_S.json").read_text())["hal_heads"]]
  assert set(sel) <= set(chosen)

