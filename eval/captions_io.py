"""Captions files: our JSONL (written incrementally, resumable) and the formats other CHAIR tools write.

Our format: one JSON object per line with ``image_id``, ``file_name``, ``caption``, ``method`` and any extra
fields; each record is appended and flushed as soon as it exists, so a crash loses at most the line being
written. A last line without its newline or that does not parse is such a torn write: it is ignored with a
warning (and cut off before the next append). A bad line anywhere else is an error naming file and line.

``load_captions`` also reads, so that ``--captions FILE`` accepts any of them:
  * OPERA-style JSONL ``{"image_id": ..., "caption": ...}``;
  * LLaVA/AIR/AD-HH answers JSONL ``{"question_id": ..., "text": ...}``;
  * the reference ``imgToEval`` JSON ``{"imgToEval": {key: {"image_id", "caption", ...}}, "overall": ...}``;
  * a reference CHAIR output ``{"sentences": [{"image_id", "caption", ...}]}`` or a JSON list of records.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

log = logging.getLogger(__name__)


class CaptionsFormatError(ValueError):
  """A captions file that cannot be read (the message names file, line and field)."""


@dataclasses.dataclass
class CaptionRecord:
  """One caption: ``image_id``, ``caption`` and the rest of the record's fields in ``extra``."""

  image_id: Any
  caption: str
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)

  def to_dict(self) -> dict[str, Any]:
    return {"image_id": self.image_id, "caption": self.caption, **self.extra}


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
  """Yield (line number, object) of a JSONL file; a torn last line is skipped with a warning.

  Raises:
    CaptionsFormatError: A line other than the last is not a JSON object.
  """
  path = Path(path)
  try:
    lines = path.read_text(encoding="utf-8").split("\n")
  except UnicodeDecodeError as e:
    raise CaptionsFormatError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); a JSONL file must be UTF-8") \
        from None
  last = max((n for n, line in enumerate(lines, 1) if line.strip()), default=0)
  for n, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      if n == last:  # the record being written when the run stopped
        log.warning("%s: ignoring an incomplete last line %d (interrupted write?): %.60r", path, n, line)
        continue
      raise CaptionsFormatError(f"{path}:{n}: not a JSON object ({e}); fix or delete that line") from e
    if not isinstance(obj, dict):
      raise CaptionsFormatError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
    yield n, obj


def repair_tail(path: str | Path) -> None:
  """Make a JSONL file safe to append to: cut an unparsable last line, terminate a complete one."""
  path = Path(path)
  if not path.exists() or path.stat().st_size == 0:
    return
  data = path.read_bytes()
  body = data.rstrip(b"\n")
  start = body.rfind(b"\n") + 1
  try:
    json.loads(body[start:])
  except (json.JSONDecodeError, UnicodeDecodeError):
    log.warning("%s: removing an incomplete last line before appending: %.60r", path, body[start:])
    with open(path, "r+b") as f:
      f.truncate(start)
    return
  if not data.endswith(b"\n"):
    with open(path, "ab") as f:
      f.write(b"\n")


def append_record(path: str | Path, record: Mapping[str, Any]) -> None:
  """Append one record as a JSON line, flushed and synced to disk."""
  line = json.dumps(dict(record), ensure_ascii=False)
  if "\n" in line:  # cannot happen with json.dumps, kept as a guard for the one-line-per-record promise
    raise ValueError("record serialises to several lines")
  with open(path, "a", encoding="utf-8") as f:
    f.write(line + "\n")
    f.flush()
    os.fsync(f.fileno())


class CaptionsWriter:
  """Appends records to a JSONL captions file (repairing a torn tail once, on open)."""

  def __init__(self, path: str | Path):
    self.path = Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    repair_tail(self.path)

  def write(self, record: Mapping[str, Any]) -> None:
    for field in ("image_id", "caption"):
      if field not in record:
        raise ValueError(f"caption record lacks {field!r}: {dict(record)}")
    append_record(self.path, record)


def _check_id(image_id: Any, where: str) -> Any:
  if isinstance(image_id, bool) or not isinstance(image_id, (int, str)):
    raise CaptionsFormatError(f"{where}: image id must be an integer or a string, got {image_id!r}")
  return image_id


def _to_record(obj: Mapping[str, Any], where: str) -> CaptionRecord:
  """Normalise one record of any supported format."""
  if "image_id" in obj:
    id_key = "image_id"
  elif "question_id" in obj:
    id_key = "question_id"
  else:
    raise CaptionsFormatError(f"{where}: record has neither 'image_id' nor 'question_id' (keys: {sorted(obj)})")
  text_key = "caption" if "caption" in obj else "text" if "text" in obj else None
  if text_key is None:
    raise CaptionsFormatError(f"{where}: record has neither 'caption' nor 'text' (keys: {sorted(obj)})")
  caption = obj[text_key]
  if caption is None:
    caption = ""
  if not isinstance(caption, str):
    raise CaptionsFormatError(f"{where}: {text_key!r} must be a string, got {type(caption).__name__}")
  extra = {k: v for k, v in obj.items() if k not in (id_key, text_key)}
  if "file_name" not in extra and isinstance(obj.get("image"), str):
    extra["file_name"] = obj["image"]  # LLaVA answers name the image file "image"
  return CaptionRecord(_check_id(obj[id_key], where), caption, extra)


def load_captions(path: str | Path) -> list[CaptionRecord]:
  """Read a captions file in any supported format (see the module docstring), in file order.

  Raises:
    FileNotFoundError: No such file.
    CaptionsFormatError: Unknown structure or a bad record (message names the file and the line/key).
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"captions file not found: {path}")
  text = path.read_text(encoding="utf-8")
  if not text.strip():
    return []
  whole: Any = None
  try:
    whole = json.loads(text)
  except json.JSONDecodeError:
    pass
  if isinstance(whole, dict) and "imgToEval" in whole:
    table = whole["imgToEval"]
    if not isinstance(table, dict):
      raise CaptionsFormatError(f"{path}: 'imgToEval' must be an object")
    return [_to_record(v, f"{path}: imgToEval[{k!r}]") for k, v in table.items()]
  if isinstance(whole, dict) and "sentences" in whole:
    return [_to_record(v, f"{path}: sentences[{n}]") for n, v in enumerate(whole["sentences"])]
  if isinstance(whole, list):
    return [_to_record(v, f"{path}: [{n}]") if isinstance(v, dict) else _bad(path, n, v)
            for n, v in enumerate(whole)]
  # JSONL (a one-record JSONL file is also a JSON object: same result)
  return [_to_record(obj, f"{path}:{n}") for n, obj in iter_jsonl(path)]


def _bad(path: Path, n: int, value: Any):
  raise CaptionsFormatError(f"{path}: [{n}] must be an object, got {type(value).__name__}")


def read_jsonl_records(path: str | Path) -> list[CaptionRecord]:
  """All complete records of our JSONL captions file (none if it does not exist)."""
  path = Path(path)
  if not path.exists():
    return []
  return [_to_record(obj, f"{path}:{n}") for n, obj in iter_jsonl(path)]


def done_ids(path: str | Path) -> set[Any]:
  """Image ids already captioned in our JSONL file (for resume)."""
  return {r.image_id for r in read_jsonl_records(path)}
