"""A tiny random DeepSeek-VL2 checkpoint in the official layout, and a torch reference model assembled from
transformers' SiglipVisionModel + DeepseekV2ForCausalLM following the official `prepare_inputs_embeds` /
`MlpProjector` (transformers has no DeepSeek-VL2 class; the official repository's code is the specification).

Test-only: imports torch and transformers. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os

import numpy as np

from tests.tiny import train_tokenizer

CANDIDATES = [[35, 35], [35, 70], [70, 35], [70, 70], [105, 35]]


class TorchDeepseekVL2:
  """The reference: official projector and layout code paths re-expressed on transformers modules."""

  def __init__(self, vision, language, proj_layers, image_newline, view_seperator, downsample=2, head=True):
    self.vision, self.language, self.proj = vision, language, proj_layers
    self.image_newline, self.view_seperator = image_newline, view_seperator
    self.downsample, self.head = downsample, head

  def project(self, x):
    import torch
    import torch.nn.functional as F

    bs, hw, dim = x.shape
    h = w = int(hw**0.5)
    pad = self.downsample - h % self.downsample if h % self.downsample else 0
    x = x.reshape(bs, h, w, dim)
    if pad:
      x = F.pad(x, (0, 0, 0, pad, 0, pad), "constant", 0)
    x = x.permute(0, 3, 1, 2)
    x = F.unfold(x, kernel_size=self.downsample, stride=self.downsample, padding=0).permute(0, 2, 1)
    for i, lin in enumerate(self.proj):
      if i:
        x = torch.nn.functional.gelu(x)
      x = lin(x)
    return x

  def embeds(self, input_ids, tiles, crops, image_token_id):
    import torch

    emb = self.project(self.vision(pixel_values=tiles).last_hidden_state)
    _, hw, n = emb.shape
    h = w = int(hw**0.5)
    feats, idx = [], 0
    for tw, th in crops:
      g = emb[idx].view(h, w, n)
      g = torch.cat([g, self.image_newline.expand(h, 1, n)], dim=1).view(-1, n)
      loc = emb[idx + 1: idx + 1 + tw * th].view(th, tw, h, w, n).permute(0, 2, 1, 3, 4).reshape(th * h, tw * w, n)
      loc = torch.cat([loc, self.image_newline.expand(th * h, 1, n)], dim=1).view(-1, n)
      parts = [g, self.view_seperator[None], loc] if self.head else [loc, self.view_seperator[None], g]
      feats.append(torch.cat(parts, 0))
      idx += 1 + tw * th
    x = self.language.get_input_embeddings()(input_ids)
    return x.masked_scatter((input_ids == image_token_id)[..., None], torch.cat(feats, 0).to(x.dtype))

  def __call__(self, input_ids, attention_mask, tiles, crops, image_token_id, **kw):
    embeds = self.embeds(input_ids, tiles, crops, image_token_id)
    return self.language(inputs_embeds=embeds, attention_mask=attention_mask, **kw)


def make_tiny_deepseek_vl2(path: str, *, seed: int = 0, global_view_pos: str = "head", moe_over: dict | None = None,
                           patch_size: int = 7):
  """Saves config.json, model.safetensors (official key layout) and tokenizer; returns (TorchDeepseekVL2, tokenizer).

  patch_size: 7 divides the 35 px tiles (5 x 5 patches); e.g. 8 does not (4 x 4, the remainder dropped, as SigLIP's
  384 px tiles in 14 px patches)."""
  import torch
  from safetensors.numpy import save_file
  from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

  tokenizer = train_tokenizer()
  image_token_id = tokenizer.convert_tokens_to_ids("<image>")
  torch.manual_seed(seed)
  vcfg = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=35, patch_size=patch_size, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
                            vision_use_head=False)
  vision = SiglipVisionModel(vcfg)
  lang = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, moe_intermediate_size=16,
              num_hidden_layers=2, num_attention_heads=4, kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=8,
              qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2,
              first_k_dense_replace=1, topk_method="greedy", max_position_embeddings=512,
              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
              pad_token_id=tokenizer.pad_token_id)
  lang.update(moe_over or {})
  language = DeepseekV2ForCausalLM(DeepseekV2Config(**lang))
  proj = [torch.nn.Linear(32 * 4, 64), torch.nn.Linear(64, 64)]
  newline, sep = torch.randn(64) * 0.5, torch.randn(64) * 0.5
  with torch.no_grad():
    for mod in (vision, language, *proj):
      for name, p in mod.named_parameters():
        if "norm" in name and "weight" in name:
          p.uniform_(0.8, 1.2)
        else:
          p.normal_(0.0, 0.15 if p.ndim >= 2 else 0.05)
  for m in (vision, language):
    m.config._attn_implementation = "eager"
    m.eval()
  ref = TorchDeepseekVL2(vision, language, proj, newline, sep, head=global_view_pos == "head")

  # Official key layout: timm SigLIP (fused qkv), per-expert MoE weights, `language.` prefix.
  sd = {}
  for k, v in vision.state_dict().items():
    v = v.numpy()
    k = k[len("vision_model."):] if k.startswith("vision_model.") else k
    if k == "embeddings.patch_embedding.weight":
      sd["vision.patch_embed.proj.weight"] = v
    elif k == "embeddings.patch_embedding.bias":
      sd["vision.patch_embed.proj.bias"] = v
    elif k == "embeddings.position_embedding.weight":
      sd["vision.pos_embed"] = v[None]
    elif k.startswith("post_layernorm."):
      sd["vision.norm." + k.rsplit(".", 1)[1]] = v
    elif k.startswith("encoder.layers."):
      i, rest = k[len("encoder.layers."):].split(".", 1)
      ren = {"layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.out_proj": "attn.proj", "mlp.fc1": "mlp.fc1",
             "mlp.fc2": "mlp.fc2"}
      sub, leaf = rest.rsplit(".", 1)
      if sub in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        continue
      sd[f"vision.blocks.{i}.{ren[sub]}.{leaf}"] = v
  for i in range(vcfg.num_hidden_layers):
    a = vision.encoder.layers[i].self_attn
    for leaf in ("weight", "bias"):
      sd[f"vision.blocks.{i}.attn.qkv.{leaf}"] = np.concatenate(
          [getattr(getattr(a, n), leaf).detach().numpy() for n in ("q_proj", "k_proj", "v_proj")])
  sd["vision.attn_pool.latent"] = np.zeros((1, 1, 32), np.float32)  # present in official checkpoints, unused
  for k, v in language.state_dict().items():
    v = v.numpy()
    if k.endswith("mlp.experts.gate_up_proj"):
      base = "language." + k[: -len("gate_up_proj")]
      inter = v.shape[1] // 2
      for j in range(v.shape[0]):
        sd[f"{base}{j}.gate_proj.weight"] = v[j, :inter]
        sd[f"{base}{j}.up_proj.weight"] = v[j, inter:]
    elif k.endswith("mlp.experts.down_proj"):
      base = "language." + k[: -len("down_proj")]
      for j in range(v.shape[0]):
        sd[f"{base}{j}.down_proj.weight"] = v[j]
    else:
      sd["language." + k] = v
  for i, lin in zip((0, 2), proj):
    sd[f"projector.layers.{i}.weight"] = lin.weight.detach().numpy()
    sd[f"projector.layers.{i}.bias"] = lin.bias.detach().numpy()
  sd["image_newline"], sd["view_seperator"] = newline.numpy(), sep.numpy()
  os.makedirs(path, exist_ok=True)
  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()}, os.path.join(path, "model.safetensors"))
  language_config = {k: v for k, v in lang.items()}
  language_config.update(model_type="deepseek_v2", use_mla=True, scoring_func="softmax", norm_topk_prob=False,
                         rope_scaling=None)
  config = {"model_type": "deepseek_vl_v2", "architectures": ["DeepseekVLV2ForCausalLM"], "tile_tag": "2D",
            "global_view_pos": global_view_pos, "candidate_resolutions": CANDIDATES,
            "vision_config": {"model_name": "siglip_tiny", "image_size": 35, "patch_size": patch_size, "width": 32,
                              "layers": 2, "heads": 4, "mlp_ratio": 2.0, "global_pool": "map", "ignore_head": True},
            "projector_config": {"projector_type": "downsample_mlp_gelu", "input_dim": 32, "n_embed": 64, "depth": 2,
                                 "mlp_ratio": 1, "downsample_ratio": 2},
            "language_config": language_config, "image_token_id": image_token_id}
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f, indent=1)
  tokenizer.save_pretrained(path)
  return ref, tokenizer
