"""air-jax: AIR (Attention Imbalance Rectification) for LLaVA-style vision-language models in JAX."""

from air_jax.air_config import LLAVA15_7B_HAL_HEADS, AIRConfig, read_heads_file, write_heads_file
from air_jax.attribution import Attributor, SampleResult, head_logprobs
from air_jax.attribution_stats import HeadStats, select_heads
from air_jax.generate import Generation, generate, generate_inputs, generate_sweep
from air_jax.loading import LoadedModel, load_pretrained
from air_jax.sharding import make_mesh

__all__ = [
    "AIRConfig", "Attributor", "Generation", "HeadStats", "LLAVA15_7B_HAL_HEADS", "LoadedModel", "SampleResult",
    "generate", "generate_inputs", "generate_sweep", "head_logprobs", "load_pretrained", "read_heads_file",
    "select_heads", "write_heads_file",
    "make_mesh",
]
