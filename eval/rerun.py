"""Rerun any evaluation from its manifest alone: ``python -m eval.rerun MANIFEST [--out DIR]``.

POPE, MMHal-Bench and MM-Vet manifests are handed to their CLI's ``--manifest`` (which takes the samples from
the manifest). A CHAIR manifest is turned back into the ``eval.chair`` command line it records (its method
only; hyperparameter overrides through a temporary --air-config file); since CHAIR's sampling is a function of
the settings, the rerun must draw exactly the manifest's images, which is checked before anything is written.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

from eval import manifest as manifest_lib


def chair_argv(man: Mapping[str, Any], out: str, air_config_path: str | None) -> list[str]:
  """The eval.chair arguments of a CHAIR manifest (its own method, a new output directory)."""
  from eval.chair import build_parser

  cli = dict(man["settings"]["cli"])
  cli.update(out=out, method=[man["method"]["name"]], captions=None, air_config=air_config_path)
  argv = []
  for action in build_parser()._actions:
    if action.dest == "help" or action.dest not in cli:
      continue
    value = cli[action.dest]
    if value is None or value is False:
      continue
    opt = action.option_strings[0]
    if value is True:
      argv.append(opt)
    elif isinstance(value, list):
      for v in value:
        argv += [opt, str(v)]
    else:
      argv += [opt, str(value)]
  return argv


def rerun_chair(man: Mapping[str, Any], out: str, source: str = "manifest") -> int:
  from eval import chair

  overrides = man["method"].get("overrides") or {}
  with tempfile.TemporaryDirectory() as tmp:
    air_config = None
    if overrides:
      air_config = str(Path(tmp) / "air_config.json")
      Path(air_config).write_text(json.dumps({man["method"]["name"]: overrides}))
    argv = chair_argv(man, out, air_config)
    parser = chair.build_parser()

    def refuse(message):  # a manifest value eval.chair's flags do not accept: name it, not eval.chair's usage
      raise manifest_lib.ManifestError(f"its settings are not a valid eval.chair run: {message}")

    parser.error = refuse
    try:
      args = parser.parse_args(argv)
    except manifest_lib.ManifestError as e:
      print(f"error: {source}: {e}", file=sys.stderr)
      return 2
    from eval import chair_splits
    from eval.coco import CocoImages

    images = CocoImages(args.coco_root, args.split)
    if args.splits != 1:
      sample = chair_splits.union(chair_splits.make_splits(images.ids, args.num_images, args.splits, args.seed,
                                                           args.split_mode))
    else:
      sample = images.sample(args.num_images, args.seed)
    want = [s["image_id"] for s in man["samples"]]
    if sample != want:
      print(f"error: the settings of this manifest now draw other images than it lists ({len(set(sample) ^ set(want))}"
            f" differ): the annotations under {args.coco_root} changed", file=sys.stderr)
      return 2
    return chair.main(argv)


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m eval.rerun", description=__doc__.splitlines()[0])
  p.add_argument("manifest")
  p.add_argument("--out", default="rerun", help="output directory of the rerun (default rerun/)")
  args = p.parse_args(argv)
  try:
    man = manifest_lib.read(args.manifest)
  except manifest_lib.ManifestError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  bench = man["benchmark"]
  if bench == "chair":
    return rerun_chair(man, args.out, args.manifest)
  forward = ["--manifest", args.manifest, "--out", args.out]
  if bench == "pope":
    from eval import pope

    return pope.main(forward)
  if bench == "mmhal":
    from eval import mmhal

    return mmhal.main(forward)
  if bench == "mmvet":
    from eval import mmvet

    return mmvet.main(forward)
  print(f"error: {args.manifest}: unknown benchmark {bench!r}", file=sys.stderr)
  return 2


if __name__ == "__main__":
  sys.exit(main())
