"""VCD, Visual Contrastive Decoding (Leng et al., CVPR 2024; official code DAMO-NLP-SG/VCD).

Views: the main rows (the image) and, as a second batch of rows in the same steps, the same prompts with a
distorted image v': forward diffusion to step t of the official 1000-step schedule,
  betas = sigmoid(linspace(-6, 6, 1000)) * (5e-3 - 1e-5) + 1e-5,  abar_t = prod_{s <= t} (1 - betas_s),
  v' = sqrt(abar_t) * v + sqrt(1 - abar_t) * eps,  eps ~ N(0, I),
applied to the processed pixel values (as `vcd_utils/vcd_add_noise.py` does to the image tensor).
Combiner (`vcd_utils/vcd_sample.py`, "version 2" cut-off): with l, l' the raw logits of the two views,
  cd = (1 + alpha) * l - alpha * l',  cd := -inf where l < log(beta) + max(l),
then the sampler (greedy argmax, or temperature / top-k / top-p sampling as in the official sampler).

Preset "vcd" (official LLaVA-1.5 settings, also those of the AIR paper's supplementary C.1): alpha (cd_alpha) 1,
beta (cd_beta) 0.1, noise_step 500.

Differences from the official code, on purpose:
- eps comes from a JAX PRNG key (`seed`): one noise field [C, H, W] per seed, shared by every image of the
  batch, so a caption does not depend on what else is in the batch (the official code draws torch.randn_like
  per call, batch size 1).
- alpha = 0 is exactly plain decoding (no cut-off either); the official code still applies the cut-off.
- Greedy decoding works (the official code only samples).
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from air_jax.methods.base import (CompiledMethod, ConfigMixin, Plan, ViewInputs, below_plausibility, check_int,
                                  check_number, concat_views)
from air_jax.methods.registry import register

NUM_STEPS = 1000


def diffusion_coefficients(step: int) -> tuple[float, float]:
  """(sqrt(abar_t), sqrt(1 - abar_t)) of the official schedule at `step` (float32 arithmetic, as torch)."""
  x = np.linspace(-6, 6, NUM_STEPS, dtype=np.float32)
  betas = (1.0 / (1.0 + np.exp(-x))).astype(np.float32) * np.float32(0.5e-2 - 1e-5) + np.float32(1e-5)
  abar = np.cumprod((1.0 - betas).astype(np.float32), dtype=np.float32)
  return float(np.sqrt(abar[step])), float(np.sqrt(np.float32(1.0) - abar[step]))


@flax.struct.dataclass
class VCDValues:
  alpha: jax.Array
  beta: jax.Array
  signal: jax.Array  # sqrt(abar_t)
  noise: jax.Array  # sqrt(1 - abar_t)
  key: jax.Array


def noise_field(key: jax.Array, image_shape) -> jax.Array:
  """The standard normal field eps of a seed for one pixel array of shape `image_shape` (e.g. [C, H, W]; shared by
  every image of a batch). Slice i of the leading axis is drawn from fold_in(key, i), so a longer array extends a
  shorter one: with tiles or patches on that axis (padded to the batch's longest example), an example's noise
  does not depend on the rest of the batch."""
  shape = tuple(image_shape)
  if not shape:
    return jax.random.normal(key, (), jnp.float32)
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(shape[0]))
  return jax.vmap(lambda k: jax.random.normal(k, shape[1:], jnp.float32))(keys)


@dataclasses.dataclass(frozen=True)
class VCDPlan(Plan):
  num_views: int = 2

  def views(self, values: VCDValues, inputs: ViewInputs, config) -> ViewInputs:
    from models.family import family_of

    def noise(pix):  # one noise field per pixel array, shared by its rows (any family's vision layout)
      eps = noise_field(values.key, pix.shape[1:]).astype(pix.dtype)
      return values.signal.astype(pix.dtype) * pix + values.noise.astype(pix.dtype) * eps[None]

    noised = family_of(config).map_pixels(config, inputs.pixel_values, noise)
    return concat_views(inputs, ViewInputs(inputs.input_ids, inputs.attention_mask, noised))

  def combine(self, values: VCDValues, logits, exit_logits, state):
    del exit_logits, state
    pos, neg = logits[0], logits[1]
    cd = (1.0 + values.alpha) * pos - values.alpha * neg
    cd = jnp.where(below_plausibility(pos, values.beta), -jnp.inf, cd)
    return jnp.where(values.alpha == 0, pos, cd)


@dataclasses.dataclass(frozen=True)
class VCDConfig(ConfigMixin):
  """alpha: contrast strength (>= 0, 0 = plain decoding); beta: adaptive plausibility in (0, 1]; noise_step: the
  diffusion step in [0, 999]; seed: PRNG seed of the noise."""

  name: str = "vcd"
  alpha: float = 1.0
  beta: float = 0.1
  noise_step: int = 500
  seed: int = 0

  def __post_init__(self):
    check_number("VCDConfig", "alpha", self.alpha, lo=0.0)
    check_number("VCDConfig", "beta", self.beta, lo=0.0, hi=1.0, lo_open=True)
    check_int("VCDConfig", "noise_step", self.noise_step, lo=0, hi=NUM_STEPS - 1)
    check_int("VCDConfig", "seed", self.seed, lo=0, hi=2 ** 63 - 1)  # jax.random.key takes a signed 64-bit int

  def compile(self, model_config) -> CompiledMethod:
    del model_config
    signal, noise = diffusion_coefficients(self.noise_step)
    f = lambda x: jnp.asarray(x, jnp.float32)
    values = VCDValues(alpha=f(self.alpha), beta=f(self.beta), signal=f(signal), noise=f(noise),
                       key=jax.random.key(self.seed))
    return CompiledMethod(plan=VCDPlan(), values=values)


register("vcd", lambda **kw: VCDConfig(**kw),
         "VCD: contrast with a diffusion-noised image (alpha 1, beta 0.1, step 500; official LLaVA-1.5)")
