"""Import a checkpoint into a VLA and save it as a weight source for config.init.

    python -m tools.import_weights --format openpi --src DIR/params --config configs/finetune.py:pi05 --out OUT
    python -m tools.import_weights --format big_vision --src pt_224.npz --config configs/pi0.py --out OUT
    python -m tools.import_weights --format hf --src paligemma-3b-pt-224/ --config configs/pi0.py --out OUT \
        --vocab truncate

The config's model is built sharded from its seed, the source is applied to it as a config.init
entry would be (vla/weights/load.py: every tensor checked first, then written one at a time),
and OUT receives:

    params/       Orbax PyTree {"params": the model's parameters}: use it as
                  --config.init='({"format": "vla", "path": "OUT"},)'
    import.json   what was imported, kept as initialized and ignored, and the model config
    assets/<asset_id>/stats.json   (openpi) the checkpoint's norm stats as our statistics, for a
                  robot source's `stats` key, so a fine-tune normalizes as the checkpoint did

The vocab flag is explicit about embedding rows: transformers' PaliGemma has 257,216 rows,
big_vision's and openpi's 257,152.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import orbax.checkpoint as ocp
from absl import app, flags
from flax import nnx

from configs import cli, specs
from data import stats as stats_lib
from data import storage
from vla import sharding
from vla.models.vla import VLA
from vla.weights.load import FORMATS, IMPORT_REPORT, VOCAB_MODES, InitSource, check_prompt_format, init_params


def import_to_directory(spec: specs.RunSpec, source: InitSource, out: str) -> dict:
    """The run spec's model, initialized from its seed with `source` applied, saved under `out`
    (see the module docstring). Returns the import.json contents."""
    check_prompt_format([source], spec.data.prompt_format)
    out_dir = storage.check_writable(out)
    mesh, rules = sharding.make_mesh(spec.mesh.axes), spec.mesh.rules
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        model = sharding.init_sharded(lambda: VLA(spec.model, rngs=nnx.Rngs(spec.train.seed)), mesh, rules)
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        del model
        params, (report,) = init_params([source], spec.model, params)
        checkpointer = ocp.PyTreeCheckpointer()
        # Orbax wants an absolute path or a URL.
        checkpointer.save((out_dir if storage.is_remote(out) else storage.path(os.path.abspath(out))) / "params",
                          args=ocp.args.PyTreeSave({"params": params}), force=True)
    report = dict(report, model=dataclasses.asdict(spec.model), seed=spec.train.seed,
                  assets=_import_norm_stats(source, out) if source.format == "openpi" else {})
    if jax.process_index() == 0:
        (out_dir / IMPORT_REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _import_norm_stats(source: InitSource, out: str) -> dict[str, str]:
    """openpi's DIR/assets/<asset_id>/norm_stats.json beside DIR/params -> OUT/assets/<asset_id>/stats.json."""
    assets = storage.path(source.path).parent / "assets"
    written = {}
    for norm_stats in sorted(assets.glob("*/norm_stats.json")) if assets.is_dir() else []:
        target = storage.join(out, "assets", norm_stats.parent.name, stats_lib.STATS_FILE)
        stats_lib.write(target, stats_lib.from_openpi(norm_stats))
        written[norm_stats.parent.name] = target
    return written


def main(argv):
    """Imports the weights, writes params/, import.json (and assets/), and prints the report."""
    del argv
    f = flags.FLAGS
    report = import_to_directory(specs.build(f.config), InitSource(f.format, f.src, vocab=f.vocab), f.out)
    print(f"imported {len(report['imported'])} parameters from {f.src} ({f.format}); {len(report['kept'])} "
          f"kept as initialized, {len(report['ignored'])} file entries ignored -> {f.out}")
    for asset, path in report["assets"].items():
        print(f"norm stats {asset!r} -> {path}")


def define_flags() -> None:
    """The command line: python -m tools.import_weights --help."""
    cli.define_config_flag("Run config whose model the weights go into, configs/FILE.py "
                           "or configs/FILE.py:ARG (required); its seed initializes the rest.", lock_config=False)
    flags.DEFINE_enum("format", None, FORMATS, "Layout of the source checkpoint: big_vision (.npz), hf "
                      "(transformers' safetensors), openpi (an openpi checkpoint's params/ directory) or vla "
                      "(a run of ours, or an earlier import) (required).")
    flags.DEFINE_string("src", None, "Source checkpoint: a .npz, a safetensors file or directory, an openpi "
                        "DIR/params, or a workdir (required).")
    flags.DEFINE_string("out", None, "Output directory (local or gs://) (required).")
    flags.DEFINE_enum("vocab", "exact", VOCAB_MODES, "Embedding rows: exact (must equal model.vocab_size), "
                      "truncate (keep the first vocab_size rows of a larger file) or pad (a smaller file "
                      "fills the first rows; the rest keep their initialization).")
    flags.mark_flags_as_required(["config", "format", "src", "out"])


if __name__ == "__main__":
    define_flags()
    app.run(main)
