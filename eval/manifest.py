"""Run manifests: the exact samples and settings of an evaluation, written next to its results.

A manifest is one JSON file (``<out>/<benchmark>_<method>_manifest.json``) holding everything needed to rerun the
evaluation without the original command line: the benchmark, the exact sample list (ids, image ids/files,
questions, labels), the prompt, max new tokens, the method with its resolved hyperparameters, the model directory
and a hash of its files, the seed, the judge identity where there is one, and the code version (``git describe``
of the source tree, else the installed package version). ``python -m eval.<benchmark> --manifest FILE`` reruns
it; the sample list is taken from the manifest, not re-sampled.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any, Mapping

from air_jax.atomic import atomic_write_json

MANIFEST_VERSION = 1
REQUIRED = ("manifest_version", "benchmark", "samples", "settings", "method", "code_version")
REPO_ROOT = Path(__file__).resolve().parent.parent


class ManifestError(ValueError):
  """A manifest file that cannot be read or rerun (the message names the file and the field)."""


@functools.lru_cache(maxsize=1)
def code_version() -> str:
  """``git describe --always --dirty --tags`` of the source tree, else ``air-jax <package version>``."""
  try:
    out = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=10, check=False)
    if out.returncode == 0 and out.stdout.strip():
      return "git " + out.stdout.strip()
  except (OSError, subprocess.SubprocessError):
    pass
  try:
    from importlib.metadata import version

    return "air-jax " + version("air-jax")
  except Exception:  # noqa: BLE001 -- not installed as a package: say so rather than fail the run
    return "unknown"


_HASHES: dict[tuple, str] = {}


def directory_hash(path: str | os.PathLike | None) -> str | None:
  """SHA-256 over the sorted (relative path, file SHA-256) pairs of every file under ``path`` (None for None).

  Hidden files and directories (e.g. ``.cache``) are skipped. Memoised per process on the files' sizes and
  modification times, so a 7B checkpoint is read once per run.
  """
  if path is None:
    return None
  root = Path(path)
  if not root.is_dir():
    raise FileNotFoundError(f"model directory not found: {root}")
  files = sorted(p for p in root.rglob("*") if p.is_file()
                 and not any(part.startswith(".") for part in p.relative_to(root).parts))
  stamp = tuple((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
  key = (str(root.resolve()), stamp)
  if key not in _HASHES:
    outer = hashlib.sha256()
    for p in files:
      inner = hashlib.sha256()
      with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
          inner.update(chunk)
      outer.update(f"{p.relative_to(root).as_posix()}\0{inner.hexdigest()}\n".encode())
    _HASHES[key] = outer.hexdigest()
  return _HASHES[key]


def manifest_path(out_dir: str | os.PathLike, benchmark: str, label: str) -> Path:
  """``<out>/<benchmark>_<label>_manifest.json``."""
  return Path(out_dir) / f"{benchmark}_{label}_manifest.json"


def build(benchmark: str, *, samples: list[Mapping[str, Any]], method: Mapping[str, Any],
          settings: Mapping[str, Any], model_dir: str | None, seed: int | None,
          judge: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """The manifest dict.

  Args:
    benchmark: "pope", "mmhal", "mmvet" or "chair".
    samples: The exact samples, in order (each a JSON object with at least an id).
    method: ``{"name", "hyperparameters"}`` as resolved by ``eval.runner.resolve_method``.
    settings: Benchmark settings (prompt, max_new_tokens, data paths, ...); everything a rerun needs.
    model_dir: Model directory (hashed) or None when answers were scored without a model.
    seed: The sampling seed (None if nothing was sampled).
    judge: The judge identity for judged benchmarks.
  """
  return {
    "manifest_version": MANIFEST_VERSION, "benchmark": benchmark, "code_version": code_version(),
    "model_dir": None if model_dir is None else str(model_dir), "model_sha256": directory_hash(model_dir),
    "method": dict(method), "seed": seed, "settings": dict(settings), "judge": None if judge is None else dict(judge),
    "num_samples": len(samples), "samples": [dict(s) for s in samples],
  }


def write(path: str | os.PathLike, manifest: Mapping[str, Any]) -> Path:
  """Writes the manifest atomically; returns its path."""
  atomic_write_json(path, dict(manifest), indent=1, ensure_ascii=False)
  return Path(path)


def read(path: str | os.PathLike, benchmark: str | None = None) -> dict[str, Any]:
  """Reads and checks a manifest.

  Raises:
    ManifestError: Unreadable, not a manifest, a missing field, or another benchmark's manifest.
  """
  path = Path(path)
  try:
    data = json.loads(path.read_text(encoding="utf-8"))
  except OSError as e:
    raise ManifestError(f"manifest {path}: cannot read it ({e})") from e
  except json.JSONDecodeError as e:
    raise ManifestError(f"manifest {path}: not valid JSON ({e})") from e
  if not isinstance(data, dict):
    raise ManifestError(f"manifest {path}: expected a JSON object")
  missing = [k for k in REQUIRED if k not in data]
  if missing:
    raise ManifestError(f"manifest {path}: missing field(s) {missing}; is it a manifest written by air-jax?")
  if data["manifest_version"] != MANIFEST_VERSION:
    raise ManifestError(f"manifest {path}: manifest_version {data['manifest_version']!r} is not supported "
                        f"(expected {MANIFEST_VERSION})")
  if benchmark is not None and data["benchmark"] != benchmark:
    raise ManifestError(f"manifest {path} is for benchmark {data['benchmark']!r}, not {benchmark!r}; run "
                        f"`python -m eval.{data['benchmark']} --manifest {path}`")
  if not isinstance(data["samples"], list) or not all(isinstance(s, dict) for s in data["samples"]):
    raise ManifestError(f"manifest {path}: 'samples' must be a list of objects")
  if not isinstance(data["method"], dict) or "name" not in data["method"]:
    raise ManifestError(f"manifest {path}: 'method' must be an object with a 'name'")
  return data


def check_model(manifest: Mapping[str, Any], model_dir: str | None, source: str) -> list[str]:
  """Warnings when a rerun's model or code differ from the manifest's (the rerun still proceeds)."""
  warnings = []
  want = manifest.get("model_sha256")
  if want and model_dir is not None:
    got = directory_hash(model_dir)
    if got != want:
      warnings.append(f"{source}: the model directory {model_dir} hashes to {got[:12]}, the manifest's model to "
                      f"{want[:12]}: results may differ")
  if manifest.get("code_version") != code_version():
    warnings.append(f"{source}: written by code {manifest.get('code_version')!r}, running {code_version()!r}")
  return warnings
