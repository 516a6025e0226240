"""Decoding methods behind the method interface: VCD, DoLa, PAI, FarSight against torch references on transformers'
eager LLaVA (tests/hf_methods_reference.py), neutral settings, batching, sweeps, sampling, errors, registry."""

import jax
import numpy as np
import pytest
import torch

import air_jax
from air_jax import decoding, methods
from air_jax.methods.vcd import noise_field
from tests.conftest import PROMPTS
from tests import hf_methods_reference as ref
from tests.tiny import random_images

N = 32  # new tokens compared with the references (EOS ignored, so every step counts)

CASES = {
    "vcd": lambda: methods.make("vcd"),
    "dola": lambda: methods.make("dola"),
    "dola_official_no_norm": lambda: methods.make("dola", final_norm=False),
    "pai": lambda: methods.make("pai", alpha=0.5, gamma=1.5),
    "pai_official_prefill": lambda: methods.make("pai", alpha=0.5, gamma=1.5, official_prefill=True),
    "farsight": lambda: methods.make("farsight"),
}


@pytest.fixture(scope="module")
def inputs(tiny_model):
  images = random_images(2, 28, seed=31)
  return air_jax.generate_inputs(tiny_model, images, PROMPTS)  # left padded to the 64 bucket


def _ours(tiny_model, cfg, inputs, n=N):
  ids, mask, pixels = inputs
  sv = decoding.SamplingValues.make(0)
  out = decoding.generate_tokens_jit(tiny_model.params, tiny_model.config, ids, mask, pixels,
                                     methods.as_compiled(cfg, tiny_model.config), sv, max_new_tokens=n, eos_ids=(),
                                     pad_id=0, output_scores=True)
  return np.asarray(out["tokens"]), np.asarray(out["scores"])


@pytest.mark.parametrize("name", list(CASES))
def test_method_equals_torch_reference(tiny_model, tiny_torch, inputs, name):
  """Batched (two prompts of different lengths, padded) = the reference run on each example alone."""
  cfg = CASES[name]()
  tokens, scores = _ours(tiny_model, cfg, inputs)
  plain, _ = _ours(tiny_model, None, inputs)
  ids, mask, pixels = inputs
  eps = np.asarray(noise_field(jax.random.key(cfg.seed), pixels.shape[1:]))[None] if name == "vcd" else None
  for row in range(ids.shape[0]):
    real = mask[row].astype(bool)
    r_tok, r_logits = ref.greedy(tiny_torch, ids[row:row + 1, real], pixels[row:row + 1], cfg, N,
                                 image_token_id=tiny_model.config.image_token_id, eps=eps)
    np.testing.assert_array_equal(tokens[row], r_tok, err_msg=f"{name} row {row}")
    finite = np.isfinite(r_logits)
    np.testing.assert_array_equal(np.isfinite(scores[row]), finite)
    np.testing.assert_allclose(scores[row][finite], r_logits[finite], atol=1e-5, rtol=1e-5)
  assert (tokens != plain).any(), f"{name} must change the greedy tokens for the test to bite"


NEUTRAL = {
    "vcd": dict(alpha=0.0),
    "pai": dict(alpha=0.0, gamma=1.0),
    "farsight": dict(enabled=False),
}


def test_neutral_settings_equal_plain_greedy(tiny_model):
  images = random_images(2, 28, seed=32)
  plain = air_jax.generate(tiny_model, "greedy", images, PROMPTS, max_new_tokens=12)
  for name, kw in NEUTRAL.items():
    out = air_jax.generate(tiny_model, methods.make(name, **kw), images, PROMPTS, max_new_tokens=12)
    np.testing.assert_array_equal(out.token_ids, plain.token_ids, err_msg=name)
  assert (air_jax.generate(tiny_model, None, images, PROMPTS, max_new_tokens=12).token_ids == plain.token_ids).all()


def test_batch_equals_each_example_alone(tiny_model):
  images = random_images(2, 28, seed=33)
  prompts = [PROMPTS[0], "Hi"]
  for name in ("pai", "dola"):
    batch = air_jax.generate(tiny_model, name, images, prompts, max_new_tokens=10)
    for i in range(2):
      alone = air_jax.generate(tiny_model, name, images[i], prompts[i], max_new_tokens=10)
      np.testing.assert_array_equal(batch.token_ids[i], alone.token_ids[0], err_msg=f"{name} row {i}")


def test_vmapped_sweep_equals_the_loop(tiny_model):
  images = random_images(2, 28, seed=34)
  cfgs = [methods.make("vcd", alpha=a) for a in (0.0, 1.0, 3.0)]
  swept = air_jax.generate_sweep(tiny_model, cfgs, images, PROMPTS, max_new_tokens=10)
  loop = [air_jax.generate(tiny_model, c, images, PROMPTS, max_new_tokens=10) for c in cfgs]
  for s, l in zip(swept, loop):
    np.testing.assert_array_equal(s.token_ids, l.token_ids)
  assert len({g.token_ids.tobytes() for g in loop}) > 1, "alpha must matter for the test to bite"


def test_sweep_of_a_searching_method_runs_each_search(tiny_model):
  """FarSight's official mode (and OPERA, HALC) bring their own search: a sweep runs it per config, as
  `generate` does, instead of the plain sampling loop."""
  images = random_images(2, 28, seed=36)
  greedy = air_jax.generate(tiny_model, None, images, PROMPTS, max_new_tokens=8)
  cfgs = [methods.make("farsight", mode="official", sigma=s) for s in (0.0, 0.8)]
  swept = air_jax.generate_sweep(tiny_model, cfgs, images, PROMPTS, max_new_tokens=8)
  for c, s in zip(cfgs, swept):
    np.testing.assert_array_equal(s.token_ids, air_jax.generate(tiny_model, c, images, PROMPTS,
                                                                max_new_tokens=8).token_ids)
  assert any(not np.array_equal(s.token_ids, greedy.token_ids) for s in swept), "the search must matter"


def test_sweep_memory_check_counts_every_view(tiny_model, monkeypatch):
  """A sweep runs configs x examples x views rows; the memory check counts all of them, as generate does."""
  from air_jax import limits

  images = random_images(2, 28, seed=37)
  one_row = limits.kv_cache_bytes(tiny_model.config, 1, 64 + 8, 4)
  monkeypatch.setattr(limits, "available_memory_bytes", lambda devices=None: one_row * 12)
  cfgs = [methods.make("vcd", alpha=a) for a in (0.0, 1.0, 2.0, 3.0)]  # 4 x 2 examples x 2 views = 16 rows
  with pytest.raises(ValueError):
    air_jax.generate_sweep(tiny_model, cfgs, images, PROMPTS, max_new_tokens=8)
  air_jax.generate_sweep(tiny_model, cfgs[:2], images, PROMPTS, max_new_tokens=8)  # 8 rows fit


def test_sampling_is_reproducible_from_a_key(tiny_model):
  images = random_images(1, 28, seed=35)
  kw = dict(max_new_tokens=12, do_sample=True, temperature=1.0)
  a = air_jax.generate(tiny_model, "vcd", images, PROMPTS[0], seed=7, **kw)
  b = air_jax.generate(tiny_model, "vcd", images, PROMPTS[0], seed=jax.random.key(7), **kw)
  c = air_jax.generate(tiny_model, "vcd", images, PROMPTS[0], seed=8, **kw)
  np.testing.assert_array_equal(a.token_ids, b.token_ids)
  assert (a.token_ids != c.token_ids).any()


def test_farsight_registers_skip_padding_inside_a_row():
  """InstructBLIP pads a row between its query tokens and the prompt: FarSight's registers and distances count
  real keys (and the unwritten generation window) only, so the row equals its compact form, in both modes."""
  import jax.numpy as jnp

  from air_jax.methods.farsight import OfficialRegisterOp, RegisterOp
  from models.segments import IMAGE, PAD, TEXT
  from models.spec import AttnContext

  def ctx(keys, queries):
    keys, queries = jnp.asarray([keys], jnp.int32), jnp.asarray([queries], jnp.int32)
    t, s = queries.shape[1], keys.shape[1]
    mask = (jnp.arange(s)[None, :] <= jnp.arange(t)[:, None])[None] & (keys != PAD)[:, None, :]
    return AttnContext(key_segments=keys, query_segments=queries, mask=mask, query_slot=jnp.arange(t))

  gap = ctx([IMAGE, IMAGE, PAD, PAD, TEXT, TEXT, PAD, PAD], [IMAGE, IMAGE, PAD, PAD, TEXT, TEXT])
  compact = ctx([IMAGE, IMAGE, TEXT, TEXT, PAD, PAD], [IMAGE, IMAGE, TEXT, TEXT])
  rows, cols = np.array([0, 1, 4, 5]), np.array([0, 1, 4, 5, 6, 7])
  for op in (RegisterOp(on=jnp.float32(1), log_alpha=jnp.log(jnp.float32(4))),
             OfficialRegisterOp(on=jnp.float32(1), sigma=jnp.float32(0.8), alibi=jnp.float32(1))):
    a = np.asarray(op.edit_masked(jnp.zeros((1, 2, 6, 8)), gap))
    b = np.asarray(op.edit_masked(jnp.zeros((1, 2, 4, 6)), compact))
    assert np.abs(b).max() > 0  # registers are placed
    np.testing.assert_allclose(a[:, :, rows][:, :, :, cols], b, rtol=1e-6, err_msg=type(op).__name__)
    assert not a[:, :, [2, 3]].any() and not a[:, :, :, [2, 3]].any()  # padding: no query row, no register


def test_farsight_official_equals_the_official_forward(tiny_model, tiny_torch, inputs):
  """mode="official": the cache-free search (two prompts of different lengths, left padded) = the official
  forward of FeilongTangmonash/FarSight re-run without a cache on each example alone."""
  cfg = methods.make("farsight", mode="official")
  ids, mask, pixels = inputs
  n = 8
  compiled = cfg.compile(tiny_model.config)
  out = compiled.plan.search(compiled.values, tiny_model.params, tiny_model.config, ids, mask, pixels,
                             max_new_tokens=n, eos_ids=(), pad_id=0)
  tokens, scores = np.asarray(out["tokens"]), np.asarray(out["scores"])
  plain, plain_scores = _ours(tiny_model, None, inputs, n=n)
  for row in range(ids.shape[0]):
    real = mask[row].astype(bool)
    r_tok, r_logits = ref.greedy_farsight_official(tiny_torch, ids[row:row + 1, real], pixels[row:row + 1], cfg, n)
    np.testing.assert_array_equal(tokens[row], r_tok, err_msg=f"row {row}")
    np.testing.assert_allclose(scores[row], r_logits, atol=1e-5, rtol=1e-5)
  # The registers change the logits (the tiny model's greedy tokens happen to survive them), and so does ALiBi.
  same = tokens == plain  # compare the logits where both runs saw the same prefix
  assert np.abs(scores[:, 0] - plain_scores[:, 0]).max() > 1e-2 and same[:, 0].all()
  no_alibi = methods.make("farsight", mode="official", alibi=False).compile(tiny_model.config)
  out2 = no_alibi.plan.search(no_alibi.values, tiny_model.params, tiny_model.config, ids, mask, pixels,
                              max_new_tokens=1, eos_ids=(), pad_id=0)
  assert np.abs(np.asarray(out2["scores"])[:, 0] - scores[:, 0]).max() > 1e-3
  # Through generate: the same tokens; the options are validated.
  gen = air_jax.generate(tiny_model, cfg, random_images(2, 28, seed=31), PROMPTS, max_new_tokens=n)
  np.testing.assert_array_equal(gen.token_ids, tokens)
  with pytest.raises(ValueError, match="FarSightConfig.mode must be 'paper' or 'official'"):
    methods.make("farsight", mode="other")


@pytest.mark.parametrize("name, kw, match", [
    ("vcd", dict(alpha=-0.5), r"VCDConfig\.alpha must be >= 0.0, got -0.5"),
    ("vcd", dict(beta=0.0), r"VCDConfig\.beta must be > 0.0, got 0.0"),
    ("vcd", dict(beta=1.5), r"VCDConfig\.beta must be <= 1.0, got 1.5"),
    ("vcd", dict(noise_step=1000), r"VCDConfig\.noise_step must lie in \[0, 999\], got 1000"),
    ("vcd", dict(seed=2 ** 63), r"VCDConfig\.seed must lie in \[0, 9223372036854775807\], got 9223372036854775808"),
    ("dola", dict(relative_top=0.0), r"DoLaConfig\.relative_top must be > 0.0, got 0.0"),
    ("dola", dict(layers=(0, 2, 40)), r"DoLaConfig\.layers=\[0, 2, 40\]: the last entry"),
    ("dola", dict(layers=(4, 2, 32)), r"DoLaConfig\.layers must be ascending"),
    ("pai", dict(alpha=-1.0), r"PAIConfig\.alpha must be >= 0.0, got -1.0"),
    ("pai", dict(plausibility=2.0), r"PAIConfig\.plausibility must be <= 1.0, got 2.0"),
    ("pai", dict(layers=(2, 40)), r"PAIConfig\.layers=\[2, 40\] must satisfy"),
    ("farsight", dict(alpha=1.0), r"FarSightConfig\.alpha must be > 1.0, got 1.0"),
    ("pai", dict(official_prefill="yes"), r"PAIConfig\.official_prefill must be a bool, got 'yes'"),
    ("farsight", dict(sigma=-1.0), r"FarSightConfig\.sigma must be >= 0.0, got -1.0"),
    ("farsight", dict(alibi="no"), r"FarSightConfig\.alibi must be a bool, got 'no'"),
    ("vcd", dict(strength=2.0), r"decoding method .vcd.: .*strength"),
    ("pai", dict(layer_ref=0), r"PAIConfig\.layer_ref must lie in \[1, None\], got 0"),
    ("pai", dict(layer_ref="32"), r"PAIConfig\.layer_ref must be an int, got '32'"),
    ("pai", dict(layer_ref=True, layers=(0, 1)), r"PAIConfig\.layer_ref must be an int, got True"),
    ("farsight", dict(layer_ref=-1), r"FarSightConfig\.layer_ref must lie in \[1, None\], got -1"),
])
def test_bad_values_are_clear_errors(name, kw, match):
  with pytest.raises((ValueError, TypeError), match=match):
    methods.make(name, **kw)


def test_layer_schedule_outside_the_model_is_an_error(tiny_model):
  with pytest.raises(ValueError, match=r"DoLaConfig\.layers=\[0, 1, 8\] does not fit this 2-layer model"):
    methods.make("dola", layers=(0, 1, 8), layer_ref=None).compile(tiny_model.config)
  with pytest.raises(ValueError, match=r"PAIConfig\.layers=\[0, 5\] is outside the model's 2 layers"):
    methods.make("pai", layers=(0, 5), layer_ref=None).compile(tiny_model.config)


def test_registry_names_and_unknown_method():
  for name in ("greedy", "air", "air_star", "adhh", "vcd", "dola", "pai", "farsight"):
    assert name in methods.names()
  with pytest.raises(ValueError, match=r"unknown decoding method 'no_such_method'; registered methods: greedy"):
    methods.make("no_such_method")
  hp = methods.hyperparameters(methods.make("vcd"))
  assert hp == {"class": "VCDConfig", "name": "vcd", "alpha": 1.0, "beta": 0.1, "noise_step": 500, "seed": 0}
  assert methods.make("air", heads="all").visual_factor == 3.5  # AIRConfig presets behind the registry
  assert set(methods.describe()) == set(methods.names()) and "VCD" in methods.describe("vcd")
  with pytest.raises(ValueError, match="unknown method 'nope'"):
    methods.describe("nope")
  torch.manual_seed(0)  # keep torch's global state deterministic for later tests


def test_debug_loop_equals_compiled_loop(tiny_model):
  images = random_images(2, 28, seed=36)
  for name in ("dola", "vcd"):
    a = air_jax.generate(tiny_model, name, images, PROMPTS, max_new_tokens=6, output_scores=True)
    b = air_jax.generate(tiny_model, name, images, PROMPTS, max_new_tokens=6, output_scores=True, debug=True)
    np.testing.assert_array_equal(a.token_ids, b.token_ids)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)


def test_batch_coupled_methods_get_no_filler_rows(tiny_model, tiny_dir, monkeypatch):
  """A method with a statistic over the batch (DoLa batch_js, the official AD-HH trigger) sees no filler rows:
  generate refuses a device split that would add them, and eval.chair does not pad its last batch."""
  import sys

  from air_jax.generate import _check_filler_rows
  from eval.chair import make_captioner

  cfg = tiny_model.config
  heads = [[0, 0], [1, 1]]
  coupled = {"dola batch_js": methods.make("dola", batch_js=True),
             "air_star official": air_jax.AIRConfig.preset("air_star", heads=heads, official_compat=True)}
  free = {"dola": methods.make("dola"), "air": air_jax.AIRConfig.preset("air", heads=heads),
          "air_star": air_jax.AIRConfig.preset("air_star", heads=heads), "vcd": methods.make("vcd")}
  for name, m in {**coupled, **free}.items():
    compiled = methods.as_compiled(m, cfg)
    assert compiled.plan.couples_rows(compiled.values) == (name in coupled), name
    _check_filler_rows(compiled, 3, 3)  # no filler rows: always fine
    if name in coupled:
      with pytest.raises(ValueError, match=r"a batch of 3 does not split evenly over the data axis \(4 rows after padding\)"):
        _check_filler_rows(compiled, 3, 4)
    else:
      _check_filler_rows(compiled, 3, 4)

  gen = sys.modules["air_jax.generate"]
  rows, original = [], gen._run
  def recording_run(params, run, spec, ids, *a, **kw):
    rows.append(ids.shape[0])
    return original(params, run, spec, ids, *a, **kw)

  monkeypatch.setattr(gen, "_run", recording_run)
  images = random_images(2, 28, seed=4)
  for overrides, want in (({"batch_js": True}, 2), ({}, 4)):
    rows.clear()
    cap = make_captioner(tiny_dir, "dola", prompt=PROMPTS[0], max_new_tokens=2, backend="cpu", overrides=overrides,
                         batch_size=4)
    assert len(cap(images, ["a", "b"])) == 2 and rows == [want]
