"""A minimal safetensors reader into numpy (bfloat16 included via ml_dtypes), without torch.

Format: 8-byte little-endian header size, a JSON header {name: {dtype, shape, data_offsets}}, then raw bytes.
The file is memory-mapped; tensors are copied out only when read.
"""

from __future__ import annotations

import json
import mmap
import os
import struct

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def _check_layout(path: str, header: dict, data_size: int) -> None:
  """Checks every tensor's dtype, shape and byte range against each other and the file size (before any read).

  A truncated file (an interrupted download of one shard is the common case) or inconsistent offsets would
  otherwise surface as a reshape error deep inside conversion, or as silently wrong weights.
  """
  for key, info in header.items():
    where = f"{path}: tensor {key!r}"
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
      raise ValueError(f"{where}: header entry must have dtype, shape and data_offsets, got {info!r}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in _DTYPES:
      raise ValueError(f"{where} has unsupported dtype {dtype!r} (supported: {sorted(_DTYPES)})")
    ok_shape = isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                               for d in shape)
    ok_offsets = (isinstance(offsets, list) and len(offsets) == 2
                  and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets))
    if not ok_shape or not ok_offsets:
      raise ValueError(f"{where}: malformed shape {shape!r} or data_offsets {offsets!r}")
    start, end = offsets
    need = int(np.prod(shape, dtype=np.int64)) * np.dtype(_DTYPES[dtype]).itemsize
    if end < start or end - start != need:
      raise ValueError(f"{where}: data_offsets {offsets} hold {end - start} bytes but shape {shape} x {dtype} "
                       f"needs {need}; the file is corrupt, download it again")
    if end > data_size:
      raise ValueError(f"{where} ends at byte {end} of the data section but the file holds only {data_size} "
                       "bytes: the file is truncated (an interrupted download?); download it again")


class SafetensorsFile:
  """Lazy access to the tensors of one `.safetensors` file."""

  def __init__(self, path: str):
    self.path = path
    with open(path, "rb") as f:
      head = f.read(8)
      if len(head) < 8:
        raise ValueError(f"{path}: not a safetensors file (too short)")
      (n,) = struct.unpack("<Q", head)
      if n > os.path.getsize(path) - 8:
        raise ValueError(f"{path}: not a safetensors file (header size {n} exceeds the file)")
      try:
        header = json.loads(f.read(n))
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a safetensors file (bad header: {e})") from e
    if not isinstance(header, dict):
      raise ValueError(f"{path}: not a safetensors file (header is not a JSON object)")
    self.metadata = header.pop("__metadata__", {})
    self.header = header
    self._offset = 8 + n
    _check_layout(path, header, os.path.getsize(path) - self._offset)
    self._file = open(path, "rb")
    size = os.path.getsize(path)
    self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else None

  def close(self) -> None:
    if self._map is not None:
      self._map.close()
    self._file.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def keys(self) -> list[str]:
    return list(self.header)

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self.header[key]["shape"])

  def get(self, key: str) -> np.ndarray:
    info = self.header[key]
    start, end = info["data_offsets"]
    buf = self._map[self._offset + start: self._offset + end]
    return np.frombuffer(buf, dtype=_DTYPES[info["dtype"]]).reshape(info["shape"])


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Reads every tensor of one file."""
  with SafetensorsFile(path) as f:
    return {k: f.get(k) for k in f.keys()}
