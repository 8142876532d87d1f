"""Generate the local training data (library: data/generation.py).

    python -m tools.generate --config configs/demo.py --out runs/demo/data
        [--config.data.episodes_per_task=N] [--processes=2] [--skip_tokenizer] [--skip_stats]
        [--clip_frames=4 --clip_stride=8 --video_rollouts_per_task=N] [--overwrite]

Writes Meta-World expert episodes (RLDS, with the subtask of every step), scene vision-language
examples, narrated video clips, the SentencePiece tokenizer, normalization statistics and, when
config.data.fast_targets (configs/pi05.py), the FAST action tokenizer under --out.
"""
import os
import time

import tensorflow_datasets as tfds
from absl import app, flags, logging
from ml_collections import config_flags

from data.generation import Settings, generate, postprocess

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file.", lock_config=True)
_OUT = flags.DEFINE_string("out", None, "Output directory (config.data.root by convention).")
_PROCESSES = flags.DEFINE_integer("processes", os.cpu_count(), "Rollout worker processes.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace existing datasets under --out.")
_SKIP_TOKENIZER = flags.DEFINE_bool("skip_tokenizer", False, "Do not train the tokenizer.")
_SKIP_STATS = flags.DEFINE_bool("skip_stats", False, "Do not compute normalization stats (nor "
                                 "fit the FAST tokenizer, which needs them).")
_CLIP_FRAMES = flags.DEFINE_integer("clip_frames", Settings.clip_frames, "Frames per video clip.")
_CLIP_STRIDE = flags.DEFINE_integer("clip_stride", Settings.clip_stride,
                                    "Control steps (1/80 s) between a clip's frames.")
_VIDEO_ROLLOUTS = flags.DEFINE_integer("video_rollouts_per_task", None,
                                       "Non-expert rollouts per task (default: a quarter of "
                                       "config.data.episodes_per_task).")
_SCENE_FRAMES = flags.DEFINE_integer("scene_frames_per_episode", Settings.scene_frames_per_episode,
                                     "Frames per train episode labelled for scenes_vl.")


def main(argv: list[str]) -> None:
    del argv
    start = time.time()
    config, out = _CONFIG.value, _OUT.value
    if config is None or out is None:
        raise app.UsageError("--config and --out are required")
    logging.set_verbosity(logging.WARNING)
    tfds.display_progress_bar(False)  # ours shows rollouts; TFDS would print per split
    settings = Settings(tuple(config.data.render_cameras), int(config.model.image_size),
                        scene_frames_per_episode=_SCENE_FRAMES.value,
                        clip_frames=_CLIP_FRAMES.value, clip_stride=_CLIP_STRIDE.value)
    summary = generate(config, out, _PROCESSES.value, _OVERWRITE.value, settings,
                       _VIDEO_ROLLOUTS.value)
    postprocess(out, config, summary["texts"], tokenizer=not _SKIP_TOKENIZER.value,
                stats=not _SKIP_STATS.value)
    per_task = ", ".join(f"{t} {summary['kept'].get(t, 0)} kept/{summary['dropped'].get(t, 0)} "
                         f"dropped" for t in config.data.tasks)
    print(f"generated in {time.time() - start:.0f} s: {per_task}; "
          f"{summary['scene_examples']} scene examples, {summary['video_examples']} video clips"
          f" -> {out}")

if __name__ == "__main__":
    app.run(main)
