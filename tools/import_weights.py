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
from ml_collections import config_flags

from vla.models.paligemma_io import FORMATS, import_to_directory
from vla.models.vla import VLAConfig

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config whose model the weights go into.",
                                          lock_config=False)
_FORMAT = flags.DEFINE_enum("format", None, FORMATS, "Checkpoint layout.")
_SRC = flags.DEFINE_string("src", None, "big_vision .npz, or a safetensors file or directory.")
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_TRUNCATE_VOCAB = flags.DEFINE_bool("truncate_vocab", False, "Keep the first model.vocab_size embedding rows of a "
                                    "larger file (transformers' PaliGemma has 257216 rows, big_vision's 257152).")


def main(argv):
    del argv
    config = _CONFIG.value
    report = import_to_directory(VLAConfig.from_config(config), config.seed, _SRC.value, _FORMAT.value, _OUT.value,
                                 truncate_vocab=_TRUNCATE_VOCAB.value)
    print(f"imported {len(report['imported'])} parameters from {report['source']} ({report['format']}); "
          f"{len(report['kept'])} kept as initialized -> {_OUT.value}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "format", "src", "out"])
    app.run(main)
