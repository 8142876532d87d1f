"""Convert datasets between the formats users have and the ones we read.

    python -m tools.convert rlds --src DIR --out DIR [--workers N]
        A TFDS dataset stored as TFRecord (every Open X-Embodiment dataset, an image-text TFDS
        dataset) -> the same dataset in ArrayRecord, which data/rlds.py and
        data/tfds_image_text.py read with random access and without TensorFlow. --src is the
        dataset directory (holding dataset_info.json) or its parent with version folders;
        --out receives the converted dataset directly. Shards convert in --workers processes
        (default: one per CPU); a rerun resumes, skipping finished shards. RLDS datasets get
        their episode lengths written into metadata.json. See data/convert_rlds.py.

    python -m tools.convert lerobot-export --src RLDS_DIR --out DIR [--spec NAME] [--split train]
            [--codebase v3.0]
        An RLDS dataset (ArrayRecord) -> a LeRobot dataset (parquet + mp4) of codebase version
        --codebase, its steps made canonical by the dataset spec --spec (data/robots.py). See
        data/lerobot_export.py.
"""
from __future__ import annotations

import json
from collections.abc import Sequence

from absl import app, flags

COMMANDS = ("rlds", "lerobot-export")


def main(argv: Sequence[str]) -> None:
    """Runs the subcommand named by the first argument and prints a one-line summary."""
    f = flags.FLAGS
    if len(argv) != 2 or argv[1] not in COMMANDS:
        given = " ".join(argv[1:]) or "nothing"
        raise app.UsageError(f"expected one subcommand, {' or '.join(COMMANDS)}; got {given} "
                             f"(python -m tools.convert --help)")
    if not f.src or not f.out:
        raise app.UsageError("--src and --out are required")
    try:
        if argv[1] == "rlds":
            from data import convert_rlds

            r = convert_rlds.convert(f.src, f.out, workers=f.workers, progress=True)
            print(f"converted {r['name']}: {r['records']} records in {r['shards']} shards "
                  f"({r['converted']} converted, {r['skipped']} already done), "
                  f"{r['bytes'] / 1e6:.1f} MB in {r['seconds']:.1f} s = {r['mb_per_s']:.1f} MB/s -> {r['out']}")
        else:
            from data import lerobot_export

            r = lerobot_export.export(f.src, f.out, spec=f.spec, split=f.split, codebase_version=f.codebase)
            print(json.dumps(r, indent=2, default=str))
    except (OSError, ValueError, KeyError) as e:  # a wrong path, a corrupt shard, an unknown spec
        raise SystemExit(f"{argv[1]} failed: {e}") from e


def define_flags() -> None:
    """The command line: python -m tools.convert --help."""
    flags.DEFINE_string("src", None, "Dataset directory to read (required).")
    flags.DEFINE_string("out", None, "Directory to write the converted dataset into (required).")
    flags.DEFINE_integer("workers", 0, "rlds: shard conversion processes (0: one per CPU, at most one "
                         "per shard; 1: in this process).")
    flags.DEFINE_string("spec", None, "lerobot-export: the dataset spec, a name registered in "
                        "data/robots.py (default: the exporter's).")
    flags.DEFINE_string("split", "train", "lerobot-export: the split to export.")
    flags.DEFINE_string("codebase", "v3.0", "lerobot-export: LeRobot codebase version to write.")


if __name__ == "__main__":
    define_flags()
    app.run(main)
