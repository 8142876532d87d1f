"""Import PaliGemma weights into a VLA and save its parameters with Orbax.

    python -m tools.import_weights --format big_vision --src pt_224.npz --config configs/pi0.py --out DIR
    python -m tools.import_weights --format hf --src paligemma-3b-pt-224/ --config configs/pi0.py --out DIR \
        --truncate_vocab

The ViT (with its projection) and the VLM expert come from the file; the action expert and the
action/state/time projections are initialized from config.seed. Writes under --out an Orbax
checkpoint of the parameters (params/) and import.json (what was imported, kept and ignored);
see vla.models.paligemma_io.import_to_directory, which also tells how to restore them. Trainers
that start from PaliGemma can call vla.models.paligemma_io.import_paligemma(model, path, format).
"""
from __future__ import annotations

from absl import app, flags

from configs import cli, specs
from data import storage
from vla.models.paligemma_io import FORMATS, import_to_directory


def main(argv):
    """Imports the weights, writes the checkpoint and import.json, and prints what was imported."""
    del argv
    f = flags.FLAGS
    spec = specs.build(f.config)
    report = import_to_directory(spec.model, spec.train.seed, f.src, f.format, storage.path(f.out),
                                 truncate_vocab=f.truncate_vocab)
    print(f"imported {len(report['imported'])} parameters from {report['source']} ({report['format']}); "
          f"{len(report['kept'])} kept as initialized -> {f.out}")


def define_flags() -> None:
    """The command line: python -m tools.import_weights --help."""
    cli.define_config_flag("Run config whose model the weights go into, configs/FILE.py "
                           "or configs/FILE.py:ARG (required); its seed initializes the rest.", lock_config=False)
    flags.DEFINE_enum("format", None, FORMATS, "Layout of the source checkpoint: big_vision (.npz) or hf "
                      "(transformers' safetensors) (required).")
    flags.DEFINE_string("src", None, "Source checkpoint: a big_vision .npz, or a safetensors file or directory "
                        "(required).")
    flags.DEFINE_string("out", None, "Output directory for the Orbax checkpoint (params/) and import.json "
                        "(required).")
    flags.DEFINE_bool("truncate_vocab", False, "Keep the first model.vocab_size embedding rows of a larger file "
                      "(transformers' PaliGemma has 257216 rows, big_vision's 257152).")
    flags.mark_flags_as_required(["config", "format", "src", "out"])


if __name__ == "__main__":
    define_flags()
    app.run(main)
