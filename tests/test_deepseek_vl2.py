"""DeepSeek-VL2 assembly: SigLIP vs transformers, tiling and token layout, logits vs the torch reference assembly
(transformers SigLIP + DeepseekV2 following the official code), official-layout loading."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from convert.hf_deepseek_vl2 import load_config, load_params
from models import deepseek_vl2, siglip
from models.deepseek_vl2_processing import USER_TEMPLATE, batch, encode, select_best_resolution
from models.segments import IMAGE, SYSTEM, segment_ids
from tests.tiny_deepseek_vl2 import make_tiny_deepseek_vl2


def images():
  from PIL import Image

  rng = np.random.default_rng(3)
  sizes = [(40, 30), (30, 80), (100, 35)]  # landscape, portrait, wide: different tile grids
  return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tiny_dsvl2"))
  ref, tok = make_tiny_deepseek_vl2(path)
  cfg = load_config(path)
  params = jax.tree.map(jnp.asarray, load_params(path, cfg))
  imgs = images()
  texts = [USER_TEMPLATE.format(prompt="Please describe this image in detail."),
           USER_TEMPLATE.format(prompt="What is in the picture?") + " <image>"]
  ids, mask, tiles, crops = batch(tok, cfg, texts, [imgs[:1], imgs[1:]], tok.pad_token_id)
  return ref, tok, cfg, params, (ids, mask, tiles, crops)


def test_select_best_resolution_matches_official_rule():
  cands = [[35, 35], [35, 70], [70, 35], [70, 70], [105, 35]]
  assert select_best_resolution((40, 30), cands) == (70, 35)  # keeps 40x30 fully in 70x35 (less waste than 70x70)
  assert select_best_resolution((30, 80), cands) == (35, 70)
  assert select_best_resolution((100, 35), cands) == (105, 35)
  assert select_best_resolution((10, 10), cands) == (35, 35)


def _official_prompt(prompt: str) -> str:
  """The official conversation text for [{"role": "<|User|>", "content": "<image>\\n" + prompt},
  {"role": "<|Assistant|>", "content": ""}]: format_messages_v2 appends str(content).strip() to the "deepseek"
  template (empty system, sep "\\n\\n"), whose get_prompt writes role + ": " + message + sep, or role + ":" for an
  empty message."""
  messages = [("<|User|>", str("<image>\n" + prompt).strip()), ("<|Assistant|>", "")]
  return "".join(role + ": " + msg + "\n\n" if msg else role + ":" for role, msg in messages)


@pytest.mark.parametrize("prompt", ["Describe the image.\n", "Describe the image. ", "  lead and trail \n ", "",
                                    "Describe the image."])
def test_prompt_is_stripped_as_official(tiny, prompt):
  _, tok, cfg, _, _ = tiny
  img = images()[0]
  out = deepseek_vl2.FAMILY.prepare_inputs(deepseek_vl2.DeepseekVL2Processor(tok), cfg, [img], [prompt], 0)
  ref = encode(tok, cfg, _official_prompt(prompt), [img])[0]
  assert out["input_ids"][0].tolist() == ref


def test_siglip_matches_transformers(tiny):
  ref, _, cfg, params, (_, _, tiles, _) = tiny
  with torch.no_grad():
    want = ref.vision(pixel_values=torch.tensor(tiles)).last_hidden_state.numpy()
  got = siglip.forward(params["vision"], cfg.vision, jnp.asarray(tiles))
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


def test_layout_and_segments(tiny):
  _, _, cfg, _, (ids, mask, tiles, crops) = tiny
  assert crops == [(2, 1), (1, 2), (3, 1)]
  assert tiles.shape[0] == sum(1 + tw * th for tw, th in crops)
  h = cfg.tile_grid
  assert h == 3  # 5x5 patches, zero-padded to 6x6, 2x2 blocks
  n_img = [cfg.num_image_tokens(*c) for c in crops]
  assert n_img[0] == 3 * 4 + 1 + 3 * 7
  assert (ids == cfg.image_token_id).sum(1).tolist() == [n_img[0], n_img[1] + n_img[2]]
  layout = deepseek_vl2.image_layout(cfg, crops)
  assert layout.shape[0] == sum(n_img)
  seg = np.asarray(segment_ids(jnp.asarray(ids), jnp.asarray(mask), cfg.image_token_id))
  assert ((seg == IMAGE) == (ids == cfg.image_token_id)).all()
  assert (seg[:, -ids.shape[1]:] == SYSTEM).any()  # BOS and "<|User|>: " precede the first image


def test_logits_and_attentions_match_reference_assembly(tiny):
  ref, _, cfg, params, (ids, mask, tiles, crops) = tiny
  assert not mask[0].all()  # left padding exercised
  pos = np.where(mask > 0, np.cumsum(mask, -1) - 1, 1)
  with torch.no_grad():
    want = ref(torch.tensor(ids), torch.tensor(mask), torch.tensor(tiles), crops, cfg.image_token_id,
               position_ids=torch.tensor(pos), output_attentions=True)
  out = deepseek_vl2.forward(params, cfg, ids, jnp.asarray(tiles), spatial_crops=crops, attention_mask=mask,
                             output_attentions=True)
  valid = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(out["logits"])[valid], want.logits.numpy()[valid], atol=1e-5, rtol=1e-5)
  for layer, ra in enumerate(want.attentions):
    for b in range(2):
      v = valid[b]
      np.testing.assert_allclose(np.asarray(out["attentions"][layer][b])[:, v][:, :, v], ra[b].numpy()[:, v][:, :, v],
                                 atol=1e-5)
  n_params = sum(int(x.size) for x in jax.tree.leaves(params))
  n_ref = (sum(p.numel() for p in ref.vision.parameters()) + sum(p.numel() for p in ref.language.parameters())
           + sum(p.numel() for lin in ref.proj for p in lin.parameters()) + 2 * 64)
  assert n_params == n_ref


def test_mismatched_prompt_and_images_are_named(tiny):
  _, _, cfg, params, (ids, mask, tiles, crops) = tiny
  with pytest.raises(ValueError, match="tiles but spatial_crops"):
    deepseek_vl2.forward(params, cfg, ids, jnp.asarray(tiles[:-1]), spatial_crops=crops, attention_mask=mask)
  bad = ids.copy()
  bad[1, np.argmax(bad[1] == cfg.image_token_id)] = 5  # one image position short
  with pytest.raises(ValueError, match="image tokens"):
    deepseek_vl2.forward(params, cfg, bad, jnp.asarray(tiles), spatial_crops=crops, attention_mask=mask)


def test_unsupported_moe_layer_freq_is_named():
  from models.deepseek_v2_config import deepseek_v2_config_from_dict

  with pytest.raises(ValueError, match="'language_config.moe_layer_freq' has unsupported value 2"):
    deepseek_v2_config_from_dict({"model_type": "deepseek_v2", "moe_layer_freq": 2})
  assert deepseek_v2_config_from_dict({"model_type": "deepseek_v2", "moe_layer_freq": 1}) == \
      deepseek_v2_config_from_dict({"model_type": "deepseek_v2"})


def test_image_token_id_comes_from_the_tokenizer_when_config_json_has_none(tmp_path):
  """The released config.json files do not name '<image>''s id; the official processor reads the tokenizer's."""
  import json

  import air_jax
  from air_jax.loading import load_config as load_config_of

  path = str(tmp_path / "ck")
  _, tok = make_tiny_deepseek_vl2(path)
  want = tok.convert_tokens_to_ids("<image>")
  with open(f"{path}/config.json") as f:
    raw = json.load(f)
  assert raw.pop("image_token_id") == want != 128815  # the tiny tokenizer's id is not the default one
  with open(f"{path}/config.json", "w") as f:
    json.dump(raw, f)
  model = air_jax.load_pretrained(path)
  assert model.config.image_token_id == want and load_config_of(path)[0].image_token_id == want
  out = air_jax.generate(model, None, images()[:1], "Describe.", max_new_tokens=3)
  assert out.token_ids.shape == (1, 3)
  raw["image_token_id"] = want + 1  # an id config.json names that the tokenizer contradicts: named, with the fix
  with open(f"{path}/config.json", "w") as f:
    json.dump(raw, f)
  with pytest.raises(ValueError, match=f"'<image>' id is {want} but the config uses {want + 1}; set "
                                       f"\"image_token_id\": {want} in config.json"):
    load_config_of(path)
