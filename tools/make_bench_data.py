"""Datasets for the input-pipeline benchmarks (tools/bench_data.py), written from nothing.

    python -m tools.make_bench_data episodes --out DIR [--episodes 10000] [--min_steps 5]
            [--max_steps 20] [--image_size 8] [--lerobot] [--tokenizer FILE]
        Many short episodes, for start-up time (the episode-length index): DIR/rlds, an RLDS
        dataset in ArrayRecord in the Meta-World layout (one camera, corner2; state and actions
        4-d; a subtask per step; 80 Hz) with its episode lengths in metadata.json, and its stats.json; with
        --lerobot also DIR/lerobot, the same episodes as LeRobot v3.0 with PNG frames in the
        parquet (data/lerobot_export.py, video=False); DIR/tokenizer.model (a copy of
        --tokenizer, else trained on the instructions). Prints the bench_data command.

    python -m tools.make_bench_data bridge-tfrecord --out DIR [--episodes 100] [--steps 30]
            [--shards 4]
        A TFRecord dataset with the feature structure of Open X-Embodiment's bridge (four 256²
        JPEG cameras, a 512-d language embedding per step), written by TFDS's own TFRecord
        writer, for conversion speed: `python -m tools.convert rlds --src DIR/bridge/0.1.0`.
        About 0.1 MB a step. Needs TensorFlow.

Images: smooth gradients plus a little noise, so they compress about as camera frames do (not
as white noise, which no codec shrinks).
"""
from __future__ import annotations

import io
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from absl import app, flags, logging
from PIL import Image
from tqdm import tqdm

COMMANDS = ("episodes", "bridge-tfrecord")
CONTROL_HZ = 80.0  # Meta-World's native rate, as tools.generate records it
TASKS = ("press the button from the top", "open the drawer", "close the drawer", "reach the goal")


def frame(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """uint8 [h, w, 3]: a random-coloured diagonal gradient with noise in [0, 8)."""
    base = np.add.outer(np.arange(h), np.arange(w))[..., None] + rng.integers(0, 255, (1, 1, 3))
    return ((base + rng.integers(0, 8, (h, w, 3))) % 256).astype(np.uint8)


def jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# ------------------------------------------------------------------ many short episodes
def episode_lengths(episodes: int, min_steps: int, max_steps: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(min_steps, max_steps + 1, episodes)


def _episode(e: int, n: int, image_size: int, seed: int) -> dict[str, Any]:
    """Episode e in data/rlds.py's layout, and its state and actions."""
    from data import rlds

    rng = np.random.default_rng([seed, e])
    state = rng.normal(0, 0.1, (n, 4)).astype(np.float32)
    actions = rng.uniform(-1, 1, (n, 4)).astype(np.float32)
    png = [rlds.encode_png(frame(rng, image_size, image_size)) for _ in range(n)]
    task = TASKS[e % len(TASKS)]
    subtasks = ["approach" if i < n // 2 else "finish" for i in range(n)]
    return rlds.rlds_episode({"corner2": png}, state, actions, np.zeros(n), task, task, True, e, subtasks)


class _Arrays:
    """State and actions held in memory, read by data/stats.dataset_stats like a dataset."""

    def __init__(self, arrays: Sequence[dict[str, np.ndarray]]):
        from data.robots import get_spec

        self.spec = get_spec("metaworld")
        self._arrays = list(arrays)
        self.episode_lengths = np.array([len(a["state"]) for a in self._arrays], np.int64)

    def __len__(self) -> int:
        return len(self._arrays)

    def lowdim(self, index: int) -> dict[str, np.ndarray]:
        return self._arrays[index]


def write_episodes(out: str, episodes: int = 10_000, min_steps: int = 5, max_steps: int = 20,
                   image_size: int = 8, lerobot: bool = False, tokenizer: str | None = None,
                   seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Writes out/rlds (+ stats.json), out/tokenizer.model and, with lerobot, out/lerobot.
    Returns {"rlds", "lerobot", "episodes", "steps", "seconds": {part: s}}."""
    from data import rlds, stats
    from data import tokenizer as tokenizer_lib

    os.makedirs(out, exist_ok=True)
    lengths = episode_lengths(episodes, min_steps, max_steps, seed)
    path, arrays, seconds = os.path.join(out, "rlds"), [], {}

    def examples() -> Iterator[dict[str, Any]]:
        for e, n in enumerate(tqdm(lengths, desc="episodes", unit="ep", disable=not progress)):
            ep = _episode(e, int(n), image_size, seed)
            arrays.append({"state": np.stack([s["observation"]["state"] for s in ep["steps"]]),
                           "actions": np.stack([s["action"] for s in ep["steps"]])})
            yield ep

    start = time.perf_counter()
    rlds.write_tfds(path, rlds.robot_features(["corner2"], image_size, 4, 4, subtasks=True), {"train": examples()},
                    {"control_hz": CONTROL_HZ, "episode_lengths": {"train": lengths.tolist()}},
                    f"{episodes} short synthetic episodes (tools/make_bench_data.py)")
    seconds["rlds"] = time.perf_counter() - start
    stats.save_stats(path, stats.dataset_stats(lambda: _Arrays(arrays), progress=False))
    if tokenizer:
        shutil.copy(tokenizer, os.path.join(out, "tokenizer.model"))
    else:
        tokenizer_lib.train_sentencepiece(list(TASKS) * 50, os.path.join(out, "tokenizer.model"), 512)
    report = {"rlds": path, "lerobot": None, "episodes": int(episodes), "steps": int(lengths.sum()),
              "seconds": seconds}
    if lerobot:
        from data import lerobot_export

        start = time.perf_counter()
        report["lerobot"] = lerobot_export.export(path, os.path.join(out, "lerobot"), video=False)["path"]
        seconds["lerobot"] = time.perf_counter() - start
    return report


# ------------------------------------------------------------------ a bridge-shaped TFRecord dataset
def bridge_episode(features: Any, n: int, rng: np.random.Generator) -> dict[str, Any]:
    """One episode of the bridge structure, its images as JPEG bytes (TFDS stores them as given)."""
    steps = []
    for i in range(n):
        steps.append({
            "action": rng.normal(size=7).astype(np.float32), "discount": np.float32(1.0),
            "is_first": i == 0, "is_last": i == n - 1, "is_terminal": i == n - 1,
            "language_embedding": rng.normal(size=512).astype(np.float32),
            "language_instruction": TASKS[int(rng.integers(len(TASKS)))],
            "observation": {**{f"image_{c}": jpeg(frame(rng, 256, 256)) for c in range(4)},
                            "state": rng.normal(size=7).astype(np.float32)},
            "reward": np.float32(i == n - 1)})
    meta = {"episode_id": np.int32(rng.integers(1 << 30)), "file_path": "synthetic",
            **{f"has_image_{c}": True for c in range(4)}, "has_language": True}
    return {"episode_metadata": meta, "steps": steps}


def write_bridge_tfrecord(out: str, episodes: int = 100, steps: int = 30, shards: int = 4,
                          seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Writes out/bridge/0.1.0 as TFRecord through TFDS (needs TensorFlow). Returns {"path",
    "bytes", "episodes", "steps", "seconds"}."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf  # noqa: F401  (TFDS writes TFRecord through it)
    import tensorflow_datasets as tfds

    from tools.oxe_features import bridge_features

    tfds.display_progress_bar(False)
    features, rng = bridge_features(), np.random.default_rng(seed)

    def examples() -> Iterator[tuple[int, dict[str, Any]]]:
        for e in tqdm(range(episodes), desc="bridge episodes", unit="ep", disable=not progress):
            yield e, bridge_episode(features, steps, rng)

    start = time.perf_counter()
    builder = tfds.dataset_builders.store_as_tfds_dataset(
        "bridge", "0.1.0", features, {"train": examples()}, data_dir=out, file_format="tfrecord",
        disable_shuffling=True, download_config=tfds.download.DownloadConfig(num_shards=shards))
    path = os.fspath(builder.data_dir)
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if ".tfrecord-" in f)
    return {"path": path, "bytes": size, "episodes": episodes, "steps": episodes * steps,
            "seconds": time.perf_counter() - start}


# ------------------------------------------------------------------ command line
def main(argv: Sequence[str]) -> None:
    f = flags.FLAGS
    logging.set_verbosity(logging.WARNING)  # TFDS logs every dataset it opens
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"expected one subcommand, {' or '.join(COMMANDS)} "
                             f"(python -m tools.make_bench_data --help)")
    if not f.out:
        raise app.UsageError("--out is required")
    if argv[1] == "episodes":
        r = write_episodes(f.out, f.episodes or 10_000, f.min_steps, f.max_steps, f.image_size, f.lerobot,
                           f.tokenizer, f.seed)
        print(f"{r['episodes']} episodes, {r['steps']} steps: {r['rlds']} "
              f"({r['seconds']['rlds']:.1f} s)" + (f", {r['lerobot']} ({r['seconds']['lerobot']:.1f} s)"
                                                   if r["lerobot"] else ""))
        sources = ["--source 'metaworld={\"kind\": \"robot\", \"path\": \"rlds\", \"spec\": \"metaworld\", "
                   "\"weight\": 1}'"]
        if r["lerobot"]:
            sources.append("--source 'lerobot={\"kind\": \"robot\", \"format\": \"lerobot\", \"path\": \"lerobot\", "
                           "\"spec\": \"metaworld_lerobot\", \"stats\": \"rlds/stats.json\", \"weight\": 0}'")
        print("start-up:\n  python -m tools.bench_data --config configs/demo.py --data_root "
              f"{f.out} --startup --source scenes_vl=none --source rollout_video=none " + " ".join(sources))
    else:
        r = write_bridge_tfrecord(f.out, f.episodes or 100, f.steps, f.shards, f.seed)
        print(f"{r['episodes']} episodes, {r['steps']} steps, {r['bytes'] / 1e6:.1f} MB of TFRecord in "
              f"{r['seconds']:.1f} s: {r['path']}\n  python -m tools.convert rlds --src {r['path']} --out OUT")


def define_flags() -> None:
    """The command line: python -m tools.make_bench_data --help."""
    flags.DEFINE_string("out", None, "Output directory (required).")
    flags.DEFINE_integer("episodes", None, "Episodes to write (default: 10000 for episodes, 100 for "
                         "bridge-tfrecord).")
    flags.DEFINE_integer("min_steps", 5, "episodes: shortest episode.")
    flags.DEFINE_integer("max_steps", 20, "episodes: longest episode.")
    flags.DEFINE_integer("image_size", 8, "episodes: frame height and width.")
    flags.DEFINE_bool("lerobot", False, "episodes: also write the LeRobot v3.0 copy (PNG frames).")
    flags.DEFINE_string("tokenizer", None, "episodes: a SentencePiece model to copy in (default: train "
                        "one on the instructions).")
    flags.DEFINE_integer("steps", 30, "bridge-tfrecord: steps per episode.")
    flags.DEFINE_integer("shards", 4, "bridge-tfrecord: TFRecord shards.")
    flags.DEFINE_integer("seed", 0, "Random seed.")


if __name__ == "__main__":
    define_flags()
    app.run(main)
