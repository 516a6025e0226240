"""DeepSeek-V2 decoder (MLA + MoE) vs transformers' DeepseekV2ForCausalLM (eager): logits, attentions, routing
(ties included), and the compressed-latent-cache decode vs a full re-forward at every step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from convert import hf_deepseek_v2
from models import deepseek_v2, moe
from models.deepseek_v2_config import deepseek_v2_config_from_dict
from models.llama import embed_tokens, lm_head
from models.llava import positions_from_mask, prompt_context
from models.spec import neutral_spec

GRID = {
    # q without LoRA, greedy routing, one dense layer then MoE, default rope
    "greedy_dense_first": dict(q_lora_rank=None, topk_method="greedy", first_k_dense_replace=1),
    # q LoRA, group-limited routing, scaled routing weights, yarn rope with mscale (softmax scale changes)
    "group_limited_yarn": dict(q_lora_rank=16, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                               routed_scaling_factor=1.5, first_k_dense_replace=0,
                               rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                                "original_max_position_embeddings": 16, "mscale": 0.707,
                                                "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1}),
    # no shared experts (transformers then stores zero-width shared-expert weights, which carry nothing)
    "no_shared_experts": dict(n_shared_experts=0, first_k_dense_replace=0),
}


def make_tiny(seed=0, **over):
  from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

  kw = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
            num_attention_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=4,
            v_head_dim=6, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
            max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
  kw.update(over)
  cfg = DeepseekV2Config(**kw)
  torch.manual_seed(seed)
  model = DeepseekV2ForCausalLM(cfg)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.uniform_(0.8, 1.2)
      else:
        p.normal_(0.0, 0.15 if p.ndim >= 2 else 0.05)
  model.config._attn_implementation = "eager"
  return model.eval()


def ours(model):
  cfg = deepseek_v2_config_from_dict(model.config.to_dict())
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  params = jax.tree.map(jnp.asarray, hf_deepseek_v2.from_state_dict(sd, cfg))
  return params, cfg


def forward(params, cfg, ids, mask, spec=None, output_attentions=False):
  ctx = prompt_context(ids, mask, image_token_id=-100)
  embeds = embed_tokens(params, ids)
  h, _, ex = deepseek_v2.decoder(params, cfg, embeds, positions_from_mask(mask), ctx, spec=spec,
                                 output_attentions=output_attentions)
  return lm_head(params, params.get("lm_head"), h), ex


def batch(vocab=64, t=12):
  rng = np.random.default_rng(0)
  ids = rng.integers(3, vocab, (2, t))
  mask = np.ones((2, t), np.int64)
  mask[1, :4] = 0
  ids[1, :4] = 0
  return ids, mask


@pytest.mark.parametrize("name", sorted(GRID))
def test_logits_and_attentions_match_transformers(name):
  model = make_tiny(**GRID[name])
  params, cfg = ours(model)
  assert sum(int(x.size) for x in jax.tree.leaves(params)) == sum(p.numel() for p in model.parameters())
  ids, mask = batch()
  pos = np.where(mask > 0, np.cumsum(mask, -1) - 1, 1)
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos),
                output_attentions=True)
  logits, ex = forward(params, cfg, jnp.asarray(ids), jnp.asarray(mask), output_attentions=True)
  valid = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(logits)[valid], ref.logits.numpy()[valid], atol=1e-5, rtol=1e-5)
  for layer, ra in enumerate(ref.attentions):
    for b in range(2):
      v = valid[b]
      np.testing.assert_allclose(np.asarray(ex["attentions"][layer][b])[:, v][:, :, v], ra[b].numpy()[:, v][:, :, v],
                                 atol=1e-5)


@pytest.mark.parametrize("name", sorted(GRID))
def test_routing_matches_transformers_including_ties(name):
  model = make_tiny(**GRID[name])
  layer = cfg_layer = model.config.first_k_dense_replace
  gate = model.model.layers[cfg_layer].mlp.gate
  with torch.no_grad():  # duplicated router rows give exactly tied scores
    gate.weight[3] = gate.weight[1]
    gate.weight[6] = gate.weight[5]
    gate.weight[7] = gate.weight[5]
  params, cfg = ours(model)
  x = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
  x[:8] = 0.0  # all scores equal: the tie-break alone decides
  with torch.no_grad():
    _, w_ref, i_ref = gate(x)
  w, idx = moe.route(cfg.router, params["layers"][layer]["mlp"]["gate"], jnp.asarray(x.numpy()))
  ref_sets = [sorted(zip(r.tolist(), wr.tolist())) for r, wr in zip(i_ref, w_ref)]
  our_sets = [sorted(zip(r.tolist(), wr.tolist())) for r, wr in zip(np.asarray(idx), np.asarray(w))]
  # Scores as the router sees them (group-limited: non-kept groups zeroed), to find boundary ties.
  k = cfg.num_experts_per_tok
  inner_ties = boundary = 0
  for row, (a, b) in enumerate(zip(ref_sets, our_sets)):
    np.testing.assert_allclose(sorted(v for _, v in a), sorted(v for _, v in b), rtol=1e-6)  # always equal
    sc, gmax = scores_of(gate, x[row])
    sc = np.sort(sc)[::-1]
    if sc[k - 1] == sc[k] or (gmax is not None and gmax[cfg.topk_group - 1] == gmax[cfg.topk_group]):
      boundary += 1  # the k-th score ties an unchosen expert: torch's pick is a std::nth_element artifact
      continue
    inner_ties += len(set(sc[:k].tolist())) < k  # tied experts inside the top-k: both must be chosen
    assert [e for e, _ in a] == [e for e, _ in b]
  assert inner_ties > 0 and boundary > 0


def scores_of(gate, x):
  with torch.no_grad():
    logits = torch.nn.functional.linear(x[None].float(), gate.weight.float())
    s = logits.softmax(-1)[0]
    if gate.topk_method == "group_limited_greedy":
      g = s.view(gate.num_group, -1)
      keep = torch.zeros(gate.num_group, dtype=torch.bool)
      keep[torch.topk(g.max(-1).values, gate.topk_group).indices] = True
      s = torch.where(keep[:, None], g, 0.0).reshape(-1)
      return s.numpy(), np.sort(g.max(-1).values.numpy())[::-1]
  return s.numpy(), None


def test_latent_cache_decode_equals_full_forward_every_step():
  from models.spec import AttnContext

  model = make_tiny(**GRID["group_limited_yarn"])
  params, cfg = ours(model)
  ids, mask = batch(t=8)
  b, t = ids.shape
  steps = 6
  size = t + steps
  spec = neutral_spec(cfg.num_hidden_layers, cfg.num_attention_heads)
  # The full re-forward runs on [B, size] right-padded with mask 0 (causal: the padding never reaches earlier
  # rows), so one compiled graph serves every step.
  full = jax.jit(lambda ids, m: forward(params, cfg, ids, m, spec=spec)[0])

  @jax.jit
  def step(cache, key_seg, tok, pos, slot):
    visible = (key_seg != -1) & (jnp.arange(size) <= slot)[None]
    dctx = AttnContext(key_segments=key_seg, query_segments=jnp.full((b, 1), 2, jnp.int32), mask=visible[:, None],
                       query_slot=slot[None], prefill=False)
    h, cache, _ = deepseek_v2.decoder(params, cfg, embed_tokens(params, tok), pos, dctx, spec=spec, cache=cache,
                                      write_index=slot)
    return lm_head(params, params.get("lm_head"), h[:, -1]), cache

  ctx = prompt_context(jnp.asarray(ids), jnp.asarray(mask), -100, key_slots=size)
  cache = deepseek_v2.init_cache(cfg, b, size, jnp.float32)
  assert cache[0]["ckv"].shape == (b, size, cfg.kv_lora_rank) and cache[0]["kpe"].shape == (b, size, 4)
  h, cache, _ = deepseek_v2.decoder(params, cfg, embed_tokens(params, jnp.asarray(ids)),
                                    positions_from_mask(jnp.asarray(mask)), ctx, spec=spec, cache=cache, write_index=0)
  logits = lm_head(params, params.get("lm_head"), h[:, -1])
  seq = np.zeros((b, size), np.int64)
  m = np.zeros((b, size), np.int64)
  seq[:, :t], m[:, :t] = ids, mask
  key_seg = ctx.key_segments
  for i in range(steps):
    ref = full(jnp.asarray(seq), jnp.asarray(m))[:, t + i - 1]
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref), atol=1e-5, rtol=1e-5)
    tok = np.asarray(jnp.argmax(logits, -1))
    key_seg = key_seg.at[:, t + i].set(2)
    pos = jnp.asarray(m.sum(-1, keepdims=True), jnp.int32)
    logits, cache = step(cache, key_seg, jnp.asarray(tok[:, None]), pos, jnp.asarray(t + i, jnp.int32))
    seq[:, t + i], m[:, t + i] = tok, 1
  ref = full(jnp.asarray(seq), jnp.asarray(m))[:, size - 1]
  np.testing.assert_allclose(np.asarray(logits), np.asarray(ref), atol=1e-5, rtol=1e-5)


def test_head_gate_ablates_the_per_head_value_mix():
  model = make_tiny(**GRID["greedy_dense_first"])
  params, cfg = ours(model)
  ids, mask = batch()
  gate = np.ones((2, 4), np.float32)
  gate[1, 2] = 0.0
  spec = neutral_spec(2, 4).replace(head_gate=jnp.asarray(gate))
  got, _ = forward(params, cfg, jnp.asarray(ids), jnp.asarray(mask), spec=spec)
  # torch reference: zero head 2's slice of o_proj's input in layer 1
  o = model.model.layers[1].self_attn.o_proj
  hook = o.register_forward_pre_hook(lambda mod, a: (a[0].view(*a[0].shape[:-1], 4, 6).clone()
                                                     .index_fill_(-2, torch.tensor([2]), 0.0).view(a[0].shape),))
  pos = np.where(mask > 0, np.cumsum(mask, -1) - 1, 1)
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos)).logits
  hook.remove()
  valid = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(got)[valid], ref.numpy()[valid], atol=1e-5, rtol=1e-5)


def test_mha_variant_equals_llama_attention_in_deepseek_layers():
  """use_mla = False (DeepSeek-VL2-Tiny): the official code builds transformers' LlamaAttention in each layer."""
  from transformers import LlamaConfig
  from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

  model = make_tiny(num_key_value_heads=2, first_k_dense_replace=1)
  lcfg = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                     max_position_embeddings=64, rope_theta=500.0)
  lcfg._attn_implementation = "eager"

  class OfficialMHA(LlamaAttention):
    def forward(self, hidden_states, attention_mask=None, position_ids=None, position_embeddings=None, **kw):
      kw.pop("cache", None)
      kw.pop("use_cache", None)
      return super().forward(hidden_states, rot(hidden_states, position_ids), attention_mask, **kw)

  rot = LlamaRotaryEmbedding(lcfg)
  torch.manual_seed(3)
  for i, layer in enumerate(model.model.layers):
    layer.self_attn = OfficialMHA(lcfg, i)
    with torch.no_grad():
      for p in layer.self_attn.parameters():
        p.normal_(0.0, 0.15)
  raw = dict(model.config.to_dict(), use_mla=False, num_key_value_heads=2, head_dim=8,
             rope_parameters={"rope_type": "default", "rope_theta": 500.0})
  cfg = deepseek_v2_config_from_dict(raw)
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  params = jax.tree.map(jnp.asarray, hf_deepseek_v2.from_state_dict(sd, cfg))
  assert sum(int(x.size) for x in jax.tree.leaves(params)) == sum(p.numel() for p in model.parameters())
  ids, mask = batch()
  pos = np.where(mask > 0, np.cumsum(mask, -1) - 1, 1)
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos),
                output_attentions=True)
  logits, ex = forward(params, cfg, jnp.asarray(ids), jnp.asarray(mask), output_attentions=True)
  valid = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(logits)[valid], ref.logits.numpy()[valid], atol=1e-5, rtol=1e-5)
  assert deepseek_v2.init_cache(cfg, 2, 5, jnp.float32)[0]["k"].shape == (2, 5, 2, 8)
  # The analyses' per-head value norms and W_QK factors of this variant (bilinear scores, GQA heads repeated).
  with torch.no_grad():
    hs = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos),
               output_hidden_states=True).hidden_states
  states = jnp.stack([jnp.asarray(hs[i].numpy()) for i in range(len(model.model.layers))])
  norms = np.asarray(deepseek_v2.value_norms(params, cfg, states))  # [L, B, H, T]
  for i, layer in enumerate(model.model.layers):
    a = layer.self_attn
    with torch.no_grad():
      v = a.v_proj(layer.input_layernorm(hs[i])).reshape(*hs[i].shape[:2], 2, 8)
      wo = a.o_proj.weight.reshape(-1, 4, 8)
      out = torch.stack([v[:, :, head // 2] @ wo[:, head].T for head in range(4)], 1)  # [B, H, T, E]
    np.testing.assert_allclose(norms[i], out.norm(dim=-1).numpy(), atol=1e-5, rtol=1e-5)
  fa, fb = deepseek_v2.qk_factors(params, cfg, 1)
  a = model.model.layers[1].self_attn
  g = model.model.layers[1].input_layernorm.weight.detach().double().numpy()
  wq = a.q_proj.weight.detach().double().numpy().reshape(4, 8, -1) * g
  wk = np.repeat(a.k_proj.weight.detach().double().numpy().reshape(2, 8, -1), 2, axis=0) * g
  np.testing.assert_allclose(np.einsum("hde,hdf->hef", fa, fb), np.einsum("hde,hdf->hef", wq, wk), rtol=1e-6)


def official_gate(x, weight, bias, cfg):
  """The official DeepSeek MoEGate (deepseek-ai/DeepSeek-VL2 modeling_deepseek.py) in torch, for the gating modes
  transformers' DeepseekV2 lacks: sigmoid scoring, noaux_tc with e_score_correction_bias, norm_topk_prob."""
  logits = torch.nn.functional.linear(x.float(), weight.float())
  scores = logits.softmax(-1) if cfg.scoring_func == "softmax" else logits.sigmoid()
  n, g = scores.shape[0], cfg.n_group
  choice = scores + bias[None]
  group_scores = choice.view(n, g, -1).topk(2, dim=-1)[0].sum(-1)
  keep = torch.zeros_like(group_scores).scatter_(1, torch.topk(group_scores, cfg.topk_group, dim=-1)[1], 1)
  mask = keep.unsqueeze(-1).expand(n, g, cfg.n_routed_experts // g).reshape(n, -1)
  idx = torch.topk(choice.masked_fill(~mask.bool(), 0.0), cfg.num_experts_per_tok, dim=-1)[1]
  w = scores.gather(1, idx)
  if cfg.num_experts_per_tok > 1 and cfg.norm_topk_prob:
    w = w / (w.sum(-1, keepdim=True) + 1e-20)
  return w * cfg.routed_scaling_factor, idx


def test_official_noaux_tc_sigmoid_normalised_gating():
  raw = dict(make_tiny().config.to_dict(), topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
             n_group=4, topk_group=2, routed_scaling_factor=2.5)
  cfg = deepseek_v2_config_from_dict(raw)
  gen = torch.Generator().manual_seed(4)
  weight, bias = torch.randn(8, 32, generator=gen) * 0.3, torch.randn(8, generator=gen) * 0.1
  x = torch.randn(40, 32, generator=gen)
  w_ref, i_ref = official_gate(x, weight, bias, cfg)
  w, idx = moe.route(cfg.router, {"weight": jnp.asarray(weight.numpy()), "e_score_correction_bias": jnp.asarray(bias.numpy())},
                     jnp.asarray(x.numpy()))
  for a, b, wa, wb in zip(i_ref.tolist(), np.asarray(idx).tolist(), w_ref.tolist(), np.asarray(w).tolist()):
    assert sorted(a) == sorted(b)
    np.testing.assert_allclose(sorted(wa), sorted(wb), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(w).sum(-1), 2.5, rtol=1e-5)  # normalised, then scaled


@pytest.mark.parametrize("scaling", [{"mscale": 0.707}, {"mscale_all_dim": 1.0},
                                     {"mscale": 0.707, "mscale_all_dim": 0.707}, {}])
def test_yarn_attention_factor_official_and_transformers(scaling):
  """The official DeepSeek-VL2 yarn factor is mscale(f, mscale) / mscale(f, mscale_all_dim) with defaults 1 and 0;
  transformers takes the ratio only when both are set. DeepSeek-VL2 configs follow the official code."""
  import math

  from models.deepseek_v2_config import deepseek_v2_config_from_dict, rope_inv_freq

  def get_mscale(f, m=1.0):
    return 1.0 if f <= 1 else 0.1 * m * math.log(f) + 1.0

  raw = {"hidden_size": 32, "num_attention_heads": 4, "max_position_embeddings": 256, "kv_lora_rank": 8,
         "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8,
         "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, **scaling}}
  official = rope_inv_freq(deepseek_v2_config_from_dict(raw, official=True))[1]
  hf = rope_inv_freq(deepseek_v2_config_from_dict(raw))[1]
  assert official == pytest.approx(get_mscale(4.0, scaling.get("mscale", 1.0))
                                   / get_mscale(4.0, scaling.get("mscale_all_dim", 0.0)), rel=1e-12)
  both = scaling.get("mscale") and scaling.get("mscale_all_dim")
  assert hf == pytest.approx(get_mscale(4.0, scaling["mscale"]) / get_mscale(4.0, scaling["mscale_all_dim"])
                             if both else get_mscale(4.0), rel=1e-12)


def random_experts(rng, x, i, e, dtype=jnp.float32):
  """Random MoE params (router + routed experts + a shared expert): gate [X, E], experts [X, I, E] / [X, E, I]."""
  arr = lambda *s: jnp.asarray(rng.standard_normal(s, np.float32) * 0.3, dtype)
  return {"gate": {"weight": arr(x, e), "e_score_correction_bias": arr(x)},
          "experts": {"gate_proj": {"weight": arr(x, i, e)}, "up_proj": {"weight": arr(x, i, e)},
                      "down_proj": {"weight": arr(x, e, i)}},
          "shared_experts": {"gate_proj": {"weight": arr(i, e)}, "up_proj": {"weight": arr(i, e)},
                             "down_proj": {"weight": arr(e, i)}}}


def each_impl(router, p, x, impls=("dense", "ragged", "tiled")):
  """moe(x) with each experts_impl forced, in one jitted call (one compilation): {impl: [..., E]}."""
  import dataclasses

  f = lambda p, x: {impl: moe.moe(dataclasses.replace(router, experts_impl=impl), p, x) for impl in impls}
  return jax.jit(f)(p, x)


ROUTERS = {
    "greedy_softmax": moe.Router(num_experts=8, num_experts_per_tok=2),
    "group_limited": moe.Router(num_experts=8, num_experts_per_tok=3, topk_method="group_limited_greedy", n_group=4,
                                topk_group=2, routed_scaling_factor=1.5),
    "noaux_tc_sigmoid": moe.Router(num_experts=8, num_experts_per_tok=3, scoring_func="sigmoid",
                                   topk_method="noaux_tc", n_group=4, topk_group=2, norm_topk_prob=True,
                                   routed_scaling_factor=2.5),
}


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_routed_experts_equal_every_expert_on_every_token(name):
  # 2 x 37 tokens: 74 * K rows spread over 8 experts, several tiles per expert group and a partly used last tile.
  rng = np.random.default_rng(1)
  p = random_experts(rng, 8, 12, 32)
  x = jnp.asarray(rng.standard_normal((2, 37, 32), np.float32))
  out = each_impl(ROUTERS[name], p, x)
  assert moe.prefill_impl(ROUTERS[name], 74) == ("ragged" if jax.default_backend() == "tpu" else "tiled")
  for impl, y in out.items():
    assert y.shape == x.shape and y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), np.asarray(out["dense"]), rtol=1e-5, atol=1e-5, err_msg=impl)


def test_routed_experts_with_every_token_on_the_same_experts():
  # Two router rows far above the rest send every token to experts 5 and 3: six groups are empty and two hold all
  # N rows each.
  rng = np.random.default_rng(2)
  p = random_experts(rng, 8, 12, 32)
  x = jnp.asarray(np.abs(rng.standard_normal((70, 32), np.float32)) * 0.1)
  w = np.asarray(p["gate"]["weight"]).copy()
  w[5], w[3] = 50.0, 40.0
  p["gate"]["weight"] = jnp.asarray(w)
  r = ROUTERS["greedy_softmax"]
  _, idx = moe.route(r, p["gate"], x)
  assert (np.asarray(idx) == [5, 3]).all()
  out = each_impl(r, p, x)
  for impl, y in out.items():
    np.testing.assert_allclose(np.asarray(y), np.asarray(out["dense"]), rtol=1e-5, atol=1e-5, err_msg=impl)


def test_routed_experts_bfloat16_and_gradients():
  rng = np.random.default_rng(3)
  r = ROUTERS["group_limited"]
  p = random_experts(rng, 8, 12, 32, jnp.bfloat16)
  x = jnp.asarray(rng.standard_normal((50, 32), np.float32), jnp.bfloat16)
  out = each_impl(r, p, x)
  ref = np.asarray(out["dense"], np.float32)
  for impl, y in out.items():
    # bfloat16 rounds at other places (the dense path weights before down_proj, the routed ones after it, as the
    # references do): equal within a few bfloat16 steps of the output's scale.
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), ref, atol=0.03 * np.abs(ref).max(), err_msg=impl)
  # Attribution differentiates through the decoder: the tiled path's gradient (scan, cond, gather and scatter)
  # equals the dense one's (ragged_dot's is jax's own rule).
  import dataclasses

  p32 = jax.tree.map(lambda a: a.astype(jnp.float32), p)
  x32 = x.astype(jnp.float32)
  loss = lambda x, impl: jnp.sum(moe.moe(dataclasses.replace(r, experts_impl=impl), p32, x) ** 2)
  grads = jax.jit(lambda x: {impl: jax.grad(loss)(x, impl) for impl in ("dense", "tiled")})(x32)
  for impl, g in grads.items():
    np.testing.assert_allclose(np.asarray(g), np.asarray(grads["dense"]), rtol=1e-4, atol=1e-4, err_msg=impl)
