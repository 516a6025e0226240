"""DeepSeek-VL2 with a patch size that does not divide the tile (as SigLIP-so400m's 384 px in 14 px patches): the
checkpoint loads through the config checks and the whole assembly equals the torch reference."""

import jax
import jax.numpy as jnp
import numpy as np
import torch

import air_jax
from convert.hf_deepseek_vl2 import load_params
from models import deepseek_vl2, siglip
from models.deepseek_vl2_processing import USER_TEMPLATE, batch
from tests.test_deepseek_vl2 import images
from tests.tiny_deepseek_vl2 import make_tiny_deepseek_vl2


def test_patch_size_not_dividing_the_tile(tmp_path):
  ref, tok = make_tiny_deepseek_vl2(str(tmp_path), patch_size=8)  # 35 px tiles: 4 x 4 patches, 3 px dropped
  cfg, _ = air_jax.loading.load_config(str(tmp_path))  # the config checks take it
  assert cfg.vision.grid == 4 and cfg.tile_grid == 2
  params = jax.tree.map(jnp.asarray, load_params(str(tmp_path), cfg))
  ids, mask, tiles, crops = batch(tok, cfg, [USER_TEMPLATE.format(prompt="Describe the image.")], [images()[:1]],
                                  tok.pad_token_id)
  with torch.no_grad():
    want_v = ref.vision(pixel_values=torch.tensor(tiles)).last_hidden_state.numpy()
    want = ref(torch.tensor(ids), torch.tensor(mask), torch.tensor(tiles), crops, cfg.image_token_id)
  np.testing.assert_allclose(np.asarray(siglip.forward(params["vision"], cfg.vision, jnp.asarray(tiles))), want_v,
                             atol=1e-5, rtol=1e-5)
  out = deepseek_vl2.forward(params, cfg, ids, jnp.asarray(tiles), spatial_crops=crops, attention_mask=mask)
  np.testing.assert_allclose(np.asarray(out["logits"]), want.logits.numpy(), atol=1e-5, rtol=1e-5)
