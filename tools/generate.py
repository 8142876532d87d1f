"""Generate the local training data (library: data/generation.py).

    python -m tools.generate --config configs/demo.py --out runs/demo/data
        [--config.data.episodes_per_task=N] [--processes=2] [--skip_tokenizer] [--skip_stats]
        [--clip_frames=4 --clip_stride=8 --video_rollouts_per_task=N] [--overwrite]

Writes Meta-World expert episodes (RLDS, with the subtask of every step), scene vision-language
examples, narrated video clips, the SentencePiece tokenizer, normalization statistics and, when
config.data.fast_targets (configs/pi05.py), the FAST action tokenizer under --out. A gs:// --out
is generated in a local temporary folder and uploaded when complete.
"""
import dataclasses
import os
import shutil
import tempfile
import time

import tensorflow_datasets as tfds
from absl import app, flags, logging

from configs import cli, specs
from data import fast_targets, storage
from data.generation import Settings, generate
from data.tokenizer import train_sentencepiece
from tools.stats import compute_stats


def postprocess(out: str, spec: specs.RunSpec, texts: list[str], tokenizer: bool = True,
                stats: bool = True) -> None:
    """Ships beside the data under `out`: the tokenizer trained on `texts`, the normalization
    statistics and, when the run asks for FAST targets, the FAST action tokenizer (fit on
    normalized chunks, so after the statistics)."""
    if tokenizer:
        train_sentencepiece(texts, os.path.join(out, spec.data.tokenizer),
                            spec.generation.tokenizer_vocab_size)
    if stats:
        data = dataclasses.replace(spec.data, root=out)
        compute_stats(data)
        if data.fast.enabled:
            fast_targets.fit_sources(data)


def main(argv: list[str]) -> None:
    """Generates everything under --out and prints what was kept and dropped per task."""
    del argv
    f = flags.FLAGS
    start = time.time()
    config, out = f.config, f.out
    if config is None or out is None:
        raise app.UsageError("--config and --out are required")
    logging.set_verbosity(logging.WARNING)
    tfds.display_progress_bar(False)  # ours shows rollouts; TFDS would print per split
    spec = specs.build(config)
    gen = spec.generation
    settings = Settings(gen.cameras, gen.image_size,
                        scene_frames_per_episode=f.scene_frames_per_episode,
                        clip_frames=f.clip_frames, clip_stride=f.clip_stride)
    remote = out if storage.is_remote(out) else None
    if remote:  # TFDS and ArrayRecord write local files: generated here, then uploaded
        target = storage.check_writable(remote)
        if any(target.iterdir()) and not f.overwrite:
            raise FileExistsError(f"{remote} is not empty; pass --overwrite to replace it")
        out = tempfile.mkdtemp(prefix="generate-")
    summary = generate(gen, out, f.processes, f.overwrite, settings, f.video_rollouts_per_task)
    postprocess(out, spec, summary["texts"], tokenizer=not f.skip_tokenizer, stats=not f.skip_stats)
    if remote:
        print(f"uploading to {remote}", flush=True)
        if target.exists():
            target.rmtree()
        storage.copy_tree(out, remote)
        shutil.rmtree(out)
        out = remote
    per_task = ", ".join(f"{t} {summary['kept'].get(t, 0)} kept/{summary['dropped'].get(t, 0)} "
                         f"dropped" for t in gen.tasks)
    print(f"generated in {time.time() - start:.0f} s: {per_task}; "
          f"{summary['scene_examples']} scene examples, {summary['video_examples']} video clips"
          f" -> {out}")


def define_flags() -> None:
    """The command line: python -m tools.generate --help."""
    cli.define_config_flag("Run config file, configs/FILE.py or configs/FILE.py:ARG "
                           "(required); override its values with --config.KEY=VALUE, e.g. "
                           "--config.data.episodes_per_task=N.")
    flags.DEFINE_string("out", None, "Output directory, config.data.root by convention (required).")
    flags.DEFINE_integer("processes", os.cpu_count(), "Rollout worker processes (default: this machine's CPU "
                         "count).")
    flags.DEFINE_bool("overwrite", False, "Replace existing datasets under --out.")
    flags.DEFINE_bool("skip_tokenizer", False, "Do not train the SentencePiece tokenizer.")
    flags.DEFINE_bool("skip_stats", False, "Do not compute normalization stats (nor fit the FAST tokenizer, which "
                      "needs them).")
    flags.DEFINE_integer("clip_frames", Settings.clip_frames, "Frames per narrated video clip.")
    flags.DEFINE_integer("clip_stride", Settings.clip_stride, "Control steps (1/80 s each) between a clip's "
                         "frames.")
    flags.DEFINE_integer("video_rollouts_per_task", None, "Non-expert rollouts per task for the video clips "
                         "(default: a quarter of config.data.episodes_per_task).")
    flags.DEFINE_integer("scene_frames_per_episode", Settings.scene_frames_per_episode, "Frames per train episode "
                         "labelled as scene vision-language examples (scenes_vl).")


if __name__ == "__main__":
    define_flags()
    app.run(main)
