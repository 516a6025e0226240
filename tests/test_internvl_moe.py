"""InternVL with a Qwen3-MoE decoder (InternVL3_5-30B-A3B-HF / 241B-A28B-HF layout) vs transformers' eager
InternVLForConditionalGeneration, on tiny random checkpoints written by `save_pretrained`.

Two decoders: "mixed" (3 layers, 8 experts, top-2, layer 1 dense through mlp_only_layers, norm_topk_prob false;
per-layer param trees) and "sparse" (2 layers, all sparse, 4 experts, top-2, norm_topk_prob true; stacked layers).
Checked: float32 logits and attention probabilities within 1e-5, the param count, greedy tokens of KV-cached
`air_jax.generate` equal to transformers' `generate`, both expert key layouts (per-expert keys as save_pretrained
and the released checkpoints store them; transformers 5.x's fused in-memory tensors), the router's ties, AIR and
head attribution.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import air_jax
from air_jax.generate import eos_token_ids
from convert.hf_internvl import load_params
from models import internvl, moe
from models.params import count_params
from tests.tiny_vl import chat, make_tiny_internvl, random_image
from tests.vl_reference import assert_logits_and_attentions, eager

PROMPTS = ["Please describe this image in detail.", "What is in the picture?"]
DECODERS = {
    "mixed": dict(text_layers=3, text_extra=dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24,
                                                 mlp_only_layers=[1], norm_topk_prob=False)),
    "sparse": dict(text_layers=2, text_extra=dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                                                  norm_topk_prob=True)),
}


@pytest.fixture(scope="module", params=sorted(DECODERS))
def tiny(request, tmp_path_factory):
  name = request.param
  path = str(tmp_path_factory.mktemp(f"internvl_moe_{name}"))
  model, hf_proc = make_tiny_internvl(path, text_type="qwen3_moe", seed=3, **DECODERS[name])
  eager(model)
  model.set_experts_implementation("eager")  # the reference loop over experts (the default is grouped_mm)
  images = [random_image(64, 32, 1), random_image(32, 32, 2), random_image(90, 30, 3)]
  texts = [chat(hf_proc, PROMPTS[0], 2), chat(hf_proc, PROMPTS[1], 1)]
  inputs = hf_proc(images=images, text=texts, return_tensors="pt", padding=True)
  mask = inputs["attention_mask"]
  inputs["position_ids"] = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # generate's convention
  config = internvl.load_config(path)
  return dict(name=name, path=path, model=model, hf_proc=hf_proc, images=images, inputs=inputs, config=config,
              params=jax.tree.map(jnp.asarray, load_params(path, config)))


def _np(inputs):
  return {k: v.numpy() for k, v in inputs.items()}


def test_config_and_param_layout(tiny):
  t = tiny["config"].text
  if tiny["name"] == "mixed":
    assert t.sparse_layers == (0, 2) and t.mixed_layers and not t.moe.norm_topk_prob
    layers = tiny["params"]["language_model"]["layers"]
    assert isinstance(layers, tuple) and "experts" in layers[0]["mlp"] and "gate_proj" in layers[1]["mlp"]
    assert layers[2]["mlp"]["experts"]["gate_proj"]["weight"].shape == (8, 24, 64)  # [X, I, E]
  else:
    assert t.sparse_layers == (0, 1) and not t.mixed_layers and t.moe.norm_topk_prob
    assert tiny["params"]["language_model"]["layers"]["mlp"]["experts"]["down_proj"]["weight"].shape == (2, 4, 64, 24)
  assert count_params(tiny["params"]) == sum(p.numel() for p in tiny["model"].parameters())


def test_logits_and_attentions_match_transformers(tiny):
  inp = tiny["inputs"]
  with torch.no_grad():
    ref = tiny["model"](**inp, output_attentions=True)
  n = _np(inp)
  out = internvl.forward(tiny["params"], tiny["config"], n["input_ids"], n["pixel_values"],
                         attention_mask=n["attention_mask"], output_attentions=True)
  assert_logits_and_attentions(out, ref, n["attention_mask"])


def test_generate_equals_transformers_generate(tiny):
  """KV-cached greedy decoding through load_pretrained (per-layer params on CPU) equals transformers' generate."""
  model = air_jax.load_pretrained(tiny["path"])
  hf_proc = tiny["hf_proc"]
  images = [[tiny["images"][0], tiny["images"][1]], tiny["images"][2]]
  out = air_jax.generate(model, None, images, PROMPTS, max_new_tokens=16, bucket=32)
  hf_proc.tokenizer.padding_side = "left"
  inputs = hf_proc(images=tiny["images"], text=[chat(hf_proc, PROMPTS[0], 2), chat(hf_proc, PROMPTS[1], 1)],
                   return_tensors="pt", padding=True)
  eos = list(eos_token_ids(model.config, model.processor.tokenizer))
  with torch.no_grad():
    ref = tiny["model"].generate(**inputs, max_new_tokens=16, do_sample=False, eos_token_id=eos,
                                 pad_token_id=model.processor.tokenizer.pad_token_id)
  ref = ref[:, inputs["input_ids"].shape[1]:].numpy()
  for b in range(2):
    n = int(out.num_tokens[b])
    assert n >= 4
    np.testing.assert_array_equal(out.token_ids[b, :n], ref[b, :n])


def _rewrite(src: str, dst: str, fuse: bool, drop: str | None = None, extra: dict | None = None) -> None:
  """A copy of checkpoint `src` at `dst` with its expert tensors fused as transformers 5.x holds them in memory
  (`model.language_model.layers.{i}.mlp.experts.gate_up_proj` [X, 2I, E], `down_proj` [X, E, I]), or kept per
  expert; `drop` removes one key, `extra` adds tensors."""
  import re
  import shutil

  from safetensors.numpy import load_file, save_file

  shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
  state = load_file(os.path.join(src, "model.safetensors"))
  out, experts = {}, {}
  for key, arr in state.items():
    m = re.match(r"^language_model\.model\.(layers\.\d+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$", key)
    if fuse and m:
      experts.setdefault(m.group(1), {}).setdefault(m.group(3), {})[int(m.group(2))] = arr
    else:
      out[key] = arr
  for base, parts in experts.items():
    stack = lambda p: np.stack([parts[p][j] for j in sorted(parts[p])])
    out[f"model.language_model.{base}.gate_up_proj"] = np.concatenate([stack("gate"), stack("up")], axis=1)
    out[f"model.language_model.{base}.down_proj"] = stack("down")
  if drop:
    out.pop(drop)
  out.update(extra or {})
  save_file(out, os.path.join(dst, "model.safetensors"))


def test_fused_expert_layout_loads_the_same_params(tiny, tmp_path):
  src, config = tiny["path"], tiny["config"]
  fused = str(tmp_path / "fused")
  _rewrite(src, fused, fuse=True)
  got = load_params(fused, config)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), tiny["params"], got)
  # Both layouts of one layer's experts, or a missing expert: named, never loaded silently.
  key = "language_model.model.layers.0.mlp.experts.1.up_proj.weight"
  from safetensors.numpy import load_file

  state = load_file(os.path.join(src, "model.safetensors"))
  both = str(tmp_path / "both")
  _rewrite(fused, both, fuse=False, extra={key: state[key]})
  with pytest.raises(ValueError, match="filled twice"):
    load_params(both, config)
  missing = str(tmp_path / "missing")
  _rewrite(src, missing, fuse=False, drop=key)
  with pytest.raises(ValueError, match=r"unfilled parameters .*experts\.up_proj\.weight"):
    load_params(missing, config)


def test_air_and_head_attribution_run(tiny):
  from air_jax.attribution import Attributor
  from eval.chair_metric import Vocabulary, score_caption

  model = air_jax.load_pretrained(tiny["path"])
  d = model.config.dims
  images = [tiny["images"][0], tiny["images"][2]]
  greedy = air_jax.generate(model, None, images, PROMPTS, max_new_tokens=4, output_attention_stats=True)
  cfg = air_jax.AIRConfig.preset("air", heads=[(0, 1), (d.num_hidden_layers - 1, 2)])
  air = air_jax.generate(model, cfg, images, PROMPTS, max_new_tokens=4, output_attention_stats=True)
  assert air.segment_mass.shape == (2, 4, d.num_hidden_layers, d.num_attention_heads, 3)
  assert not np.allclose(air.segment_mass, greedy.segment_mass)  # the intervention reached the attention
  # A neutral setting (AIR with no strength) decodes exactly the greedy tokens.
  neutral = air_jax.generate(model, cfg.replace(beta=0.0, realloc=False, qk_rescale=False), images, PROMPTS,
                             max_new_tokens=4)
  np.testing.assert_array_equal(neutral.token_ids, greedy.token_ids)
  sentence = score_caption(1, "A cat sits on a red chair next to a dog.", {"chair"}, Vocabulary.coco())
  assert model.family.supports_layer_reuse(model.config) == (tiny["name"] == "sparse")
  # Head attribution: layer-by-layer reuse of the clean run (stacked MoE layers) or the plain reruns (mixed).
  r = Attributor(model).attribute(tiny["images"][0], sentence)
  assert r.scored and r.ablated_logprob.shape == (len(r.scored), d.num_hidden_layers, d.num_attention_heads)
  assert np.isfinite(r.ablated_logprob).all() and np.abs(r.ablated_logprob - r.clean_logprob[:, None, None]).max() > 0


def test_routing_matches_transformers_including_ties():
  """Qwen3-MoE's router (input-dtype logits, float32 softmax, top-k, renormalised or not) equals transformers'.
  Duplicated router rows give exactly tied scores: tied experts inside the top-k are both chosen (in any order: the
output sums over them);
  at a tie on the k-th place torch's pick is a std::nth_element / partial_sort artifact (no index rule), so only the
  weights are compared there."""
  from transformers import Qwen3MoeConfig
  from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

  for norm in (False, True):
    hf = Qwen3MoeConfig(hidden_size=32, num_experts=8, num_experts_per_tok=3, norm_topk_prob=norm)
    gate = Qwen3MoeTopKRouter(hf)
    torch.manual_seed(0)
    with torch.no_grad():
      gate.weight.normal_()
      gate.weight[3] = gate.weight[1]
      gate.weight[6] = gate.weight[5]
    x = torch.randn(256, 32, generator=torch.Generator().manual_seed(1))
    x[:8] = 0.0  # all scores equal
    with torch.no_grad():
      _, w_ref, i_ref = gate(x)
    r = moe.Router(num_experts=8, num_experts_per_tok=3, norm_topk_prob=norm, deepseek_norm=False,
                   float32_logits=False)
    w, idx = moe.route(r, {"weight": jnp.asarray(gate.weight.detach().numpy())}, jnp.asarray(x.numpy()))
    w, idx = np.asarray(w), np.asarray(idx)
    scores = np.sort(torch.softmax(x @ gate.weight.detach().T, -1).numpy(), axis=1)[:, ::-1]
    inner = boundary = 0
    for row in range(x.shape[0]):
      np.testing.assert_allclose(np.sort(w[row]), np.sort(w_ref[row].numpy()), rtol=1e-5)
      if scores[row, 2] == scores[row, 3]:
        boundary += 1
        continue
      inner += len(set(scores[row, :3].tolist())) < 3
      assert sorted(idx[row].tolist()) == sorted(i_ref[row].tolist()), row  # the order within the top-k is unused
    assert inner > 0 and boundary > 0
    if norm:
      np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)


def test_sharding_rules_split_experts_inside_each_expert():
  from air_jax.sharding import spec_for

  raw = json.load(open(os.path.join(os.path.dirname(__file__), "fixtures", "configs", "InternVL3_5-30B-A3B-HF.json")))
  config = internvl.config_from_dict(raw)
  rules = internvl.FAMILY.partition_rules(config)
  stacked = ("language_model", "layers", "mlp", "experts")
  assert tuple(spec_for(rules, stacked + ("gate_proj", "weight"), (48, 128, 768, 2048), 4)) == (None, None, "model",
                                                                                                 None)
  assert tuple(spec_for(rules, stacked + ("down_proj", "weight"), (48, 128, 2048, 768), 4)) == (None, None, None,
                                                                                                "model")
  assert tuple(spec_for(rules, ("language_model", "layers", "mlp", "gate", "weight"), (48, 128, 2048), 4)) == ()
  # Mixed dense/MoE decoders keep per-layer trees: no stacked axis is assumed after `layers.{i}`.
  per_layer = ("language_model", "layers", "3", "mlp", "experts", "up_proj", "weight")
  assert tuple(spec_for(rules, per_layer, (128, 768, 2048), 4)) == (None, "model", None)
  assert tuple(spec_for(rules, ("language_model", "layers", "3", "self_attn", "q_proj", "weight"), (4096, 2048),
                        4)) == ("model", None)


@pytest.mark.parametrize("norm", [False, True])
def test_routed_experts_equal_every_expert_on_every_token(norm):
  # Qwen3-MoE's router (logits in the input dtype, plain renormalisation, no shared experts), float32 and bfloat16.
  from tests.test_deepseek_v2 import each_impl, random_experts

  rng = np.random.default_rng(5)
  r = moe.Router(num_experts=8, num_experts_per_tok=3, norm_topk_prob=norm, deepseek_norm=False, float32_logits=False)
  for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 0.03)):
    p = {k: v for k, v in random_experts(rng, 8, 12, 32, dtype).items() if k != "shared_experts"}
    x = jnp.asarray(rng.standard_normal((45, 32), np.float32), dtype)
    out = {k: np.asarray(v, np.float32) for k, v in each_impl(r, p, x).items()}
    for impl, y in out.items():
      np.testing.assert_allclose(y, out["dense"], rtol=tol, atol=tol * np.abs(out["dense"]).max(), err_msg=impl)


@pytest.mark.parametrize("bad, field", [({"num_experts_per_tok": 9}, "text_config.num_experts_per_tok"),
                                        ({"decoder_sparse_step": 0}, "text_config.decoder_sparse_step"),
                                        ({"num_experts": -1}, "text_config.num_experts")])
def test_bad_moe_config_values_are_named(bad, field):
  from models.qwen_text import qwen_text_config_from_dict

  d = {"model_type": "qwen3_moe", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
       "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "num_experts": 8,
       "num_experts_per_tok": 2, "moe_intermediate_size": 16, **bad}
  with pytest.raises(ValueError, match=field.replace(".", r"\.")):
    qwen_text_config_from_dict(d)
