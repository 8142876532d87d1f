"""Export a training run's checkpoint as a deployment bundle (layout: vla/bundle.py).

    python -m tools.export --workdir DIR [--step N] --out BUNDLE [--dtype bfloat16|float32]
        [--batch_size 1] [--platforms cpu,cuda] [--overwrite]

The parameters (the EMA when the run kept one) are restored onto one device, whatever mesh
trained them, a LoRA run's adapters are merged into their weights (vla.models.lora.merge_lora:
the bundle's model has none, so vla.policy and vla.serve need no LoRA code), and cast to
--dtype; the action sampler is exported at --batch_size for
--platforms (default: this machine's backend; lowering for another works without its hardware).
Then: `python -m vla.serve --bundle BUNDLE`, or `vla.policy.Policy.from_bundle(BUNDLE)`.
"""
from __future__ import annotations

from collections.abc import Sequence

from absl import app, flags, logging

from vla import bundle


def main(argv: Sequence[str]) -> None:
    """Exports the checkpoint as a bundle, printing progress; exits with the reason if it cannot."""
    del argv
    logging.set_verbosity(logging.ERROR)  # Orbax narrates every file, and warns about read-only use
    f = flags.FLAGS
    platforms = tuple(p for p in f.platforms.split(",") if p) or None
    try:
        bundle.export(f.workdir, f.out, step=f.step, dtype=f.dtype, batch_size=f.batch_size,
                      overwrite=f.overwrite, platforms=platforms, progress=lambda line: print(line, flush=True))
    except (OSError, ValueError) as e:  # a missing run, an existing or unwritable --out, a bad step
        raise SystemExit(f"export failed: {e}") from e


def define_flags() -> None:
    """The command line: python -m tools.export --help."""
    flags.DEFINE_string("workdir", None, "The training run's directory; its checkpoints/ directory is read "
                        "(required).")
    flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the newest).")
    flags.DEFINE_string("out", None, "Bundle directory to write (required).")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Dtype the parameters are cast to in the "
                      "bundle.")
    flags.DEFINE_integer("batch_size", 1, "Batch size of the exported action sampler (observations per call).")
    flags.DEFINE_string("platforms", "", "Comma-separated platforms to export the sampler for: cpu, cuda, rocm, "
                        "tpu (default: this machine's backend).")
    flags.DEFINE_bool("overwrite", False, "Replace an existing bundle at --out (otherwise the export fails).")
    flags.mark_flags_as_required(["workdir", "out"])


if __name__ == "__main__":
    define_flags()
    app.run(main)
