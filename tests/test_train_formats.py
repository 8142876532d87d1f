"""The trainer on every data format at once: Open X-Embodiment RLDS as published (TFRecord,
converted by tools.convert rlds), a LeRobot v3.0 dataset written by LeRobot itself (and its
videos alone, as captioned clips), webdataset tar shards and a folder of mp4 clips with captions,
mixed in one run."""
from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from configs import specs
from tests.test_convert_rlds import converted, sources  # noqa: F401 (fixtures: bridge-shaped TFRecord -> ArrayRecord)
from tests.test_lerobot import FIXTURES, SPEC
from tests.test_train import read_metrics, small_config
from tools.stats import compute_stats
from vla import train as train_lib

LEROBOT = "lerobot044_v30_video_h264"
needs_fixture = pytest.mark.skipif(not (FIXTURES / LEROBOT).is_dir(), reason=f"no LeRobot fixture {LEROBOT}")


def _webdataset(folder: str, n: int = 6) -> None:
    """Image-caption samples in the webdataset tar layout (written by webdataset's own TarWriter)."""
    import io

    import webdataset as wds

    os.makedirs(folder)
    rng = np.random.default_rng(0)
    with wds.TarWriter(os.path.join(folder, "shard-00000.tar")) as sink:
        for k in range(n):
            png = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (20, 30, 3), np.uint8)).save(png, format="PNG")
            sink.write({"__key__": f"{k:06d}", "png": png.getvalue(), "txt": f"a picture number {k}"})


@needs_fixture
def test_a_mixture_of_every_format_trains(generated_root, converted, tmp_path):  # noqa: F811
    root = str(tmp_path)
    shutil.copytree(converted["bridge"][0], os.path.join(root, "bridge"))
    shutil.copytree(FIXTURES / LEROBOT, os.path.join(root, "lerobot"))
    _webdataset(os.path.join(root, "web"))
    os.makedirs(os.path.join(root, "clips"))
    shutil.copy(FIXTURES / LEROBOT / "videos" / "observation.images.top" / "chunk-000" / "file-000.mp4",
                os.path.join(root, "clips", "drawer.mp4"))
    with open(os.path.join(root, "clips", "captions.jsonl"), "w") as f:
        f.write(json.dumps({"video": "drawer.mp4", "caption": "a robot opens a drawer"}) + "\n")
    shutil.copy(os.path.join(generated_root, "tokenizer.model"), root)
    # Pairs, not a dict: a config's dicts are ConfigDicts, which refuse dotted keys like LeRobot's.
    lerobot_spec = {**SPEC, "camera_keys": (("observation.images.top", "base"),
                                            ("observation.images.wrist", "left_wrist"))}

    c = small_config(root, total_steps=3, eval_every=3, checkpoint_every=3)
    c.model.cameras = ("base", "left_wrist", "right_wrist")
    c.model.state_dim, c.model.action_dim = 8, 7
    c.knobs.control_hz, c.knobs.chunk_s = 5.0, 1.0
    c.data.fast_targets = False
    c.data.eval_split = "34%"  # neither robot dataset has a "heldout" split
    c.data.sources = {
        "bridge": dict(kind="robot", format="rlds", path="bridge", spec="bridge", weight=1.0, eval_split="val"),
        "lerobot": dict(kind="robot", format="lerobot", path="lerobot", spec=lerobot_spec, weight=1.0),
        "web": dict(kind="vl", format="webdataset", path="web", weight=1.0, fields={"image_key": "png"}),
        "clips": dict(kind="video", format="clips", path="clips", weight=1.0, fields={"clips_per_video": 4}),
        # The LeRobot dataset's videos again, without actions: episodes as clips, tasks as captions.
        "lerobot_video": dict(kind="video", format="lerobot", path="lerobot", weight=1.0,
                              fields={"camera_key": "observation.images.wrist", "clips_per_video": 2}),
    }
    compute_stats(specs.build(c).data, workers=0, progress=False)
    workdir = os.path.join(root, "run")
    train_lib.train(train_lib.prepare(c, workdir))
    rows = read_metrics(workdir)
    keys = {k for r in rows for k in r}
    for name in ("bridge", "lerobot"):
        assert f"flow_loss/{name}" in keys, sorted(keys)
    for name in ("web", "clips", "lerobot_video"):
        assert f"text_loss/{name}" in keys, sorted(keys)
    assert rows[-1]["step"] == 3 and all(math.isfinite(v) for r in rows for v in r.values()
                                         if isinstance(v, float))
    assert any(k.startswith("eval/") for k in keys)  # the eval split: bridge's val + a lerobot hold-out
