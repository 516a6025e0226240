"""air-jax: AIR (Attention Imbalance Rectification) and its baselines for vision-language models in JAX."""

from air_jax.air_config import (LLAVA15_7B_HAL_HEADS, LLAVA15_13B_HAL_HEADS, AIRConfig, read_heads_file,
                                write_heads_file)
from air_jax.attribution import Attributor, SampleResult, head_logprobs, screen_deltas, screen_logprobs
from air_jax.attribution_stats import HeadStats, select_heads
from air_jax.beam_search import beam_search_tokens
from air_jax.detectors import Detection, Detector, GroundingDinoDetector, OwlDetector
from air_jax.generate import Generation, generate, generate_inputs, generate_sweep
from air_jax.hub import CheckpointNotFoundError, resolve_checkpoint
from air_jax.images import ImageError, load_image
from air_jax.loading import LoadedModel, load_pretrained
from air_jax.sharding import make_mesh
from air_jax import methods  # noqa: E402  (decoding methods: registry and interface)
from air_jax import analysis  # noqa: E402 -- the seed's analyses (air_jax.analysis.*)

__all__ = [
    "AIRConfig", "Attributor", "CheckpointNotFoundError", "Detection", "Detector", "Generation", "GroundingDinoDetector", "HeadStats",
    "ImageError", "LLAVA15_13B_HAL_HEADS", "LLAVA15_7B_HAL_HEADS", "LoadedModel", "OwlDetector", "SampleResult",
    "analysis", "beam_search_tokens", "generate", "generate_inputs", "generate_sweep", "head_logprobs",
    "load_image", "load_pretrained", "make_mesh", "methods", "read_heads_file", "resolve_checkpoint", "screen_deltas",
    "screen_logprobs", "select_heads", "write_heads_file",
]
