"""Export a training run's checkpoint as a deployment bundle (layout: vla/bundle.py).

    python -m tools.export --workdir DIR [--step N] --out BUNDLE [--dtype bfloat16|float32]
        [--batch_size 1] [--platforms cpu,cuda] [--overwrite]

The parameters (the EMA when the run kept one) are restored onto one device, whatever mesh
trained them, and cast to --dtype; the action sampler is exported at --batch_size for
--platforms (default: this machine's backend; lowering for another works without its hardware).
Then: `python -m vla.serve --bundle BUNDLE`, or `vla.policy.Policy.from_bundle(BUNDLE)`.
"""
from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str]) -> None:
    from absl import flags, logging

    from vla import bundle

    del argv
    logging.set_verbosity(logging.ERROR)  # Orbax narrates every file, and warns about read-only use
    f = flags.FLAGS
    platforms = tuple(p for p in f.platforms.split(",") if p) or None
    try:
        bundle.export(f.workdir, f.out, step=f.step, dtype=f.dtype, batch_size=f.batch_size,
                      overwrite=f.overwrite, platforms=platforms, progress=lambda line: print(line, flush=True))
    except (FileNotFoundError, FileExistsError, PermissionError, ValueError) as e:
        raise SystemExit(f"export failed: {e}") from e


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("workdir", None, "The training run (its checkpoints/ directory is read).")
    flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the newest).")
    flags.DEFINE_string("out", None, "Bundle directory to write.")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter dtype in the bundle.")
    flags.DEFINE_integer("batch_size", 1, "Batch size of the exported action sampler.")
    flags.DEFINE_string("platforms", "", "Comma-separated platforms to export for (cpu, cuda, rocm, tpu).")
    flags.DEFINE_bool("overwrite", False, "Replace an existing bundle at --out.")
    flags.mark_flags_as_required(["workdir", "out"])
    app.run(main)
