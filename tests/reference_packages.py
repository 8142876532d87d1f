"""Reference implementations whose PyPI requirements clash with ours, fetched for the tests alone.

openpi-client 0.1.2 pins numpy < 2 and lerobot-dataset 0.4.4 pins transformers-era versions of
datasets, av and huggingface-hub (installing it would downgrade transformers and numpy for
everything else). Their own code runs on our versions, so each is downloaded from the package
index without its dependencies, once per machine (~/.cache/vla/wheels, or $VLA_DATA_CACHE's
wheels/), unpacked, and imported from there (put on sys.path or a child's PYTHONPATH).
"""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import pytest

from data import storage


def wheel(requirement: str) -> str:
    """The unpacked wheel of `requirement` ("name==version"), an import path; downloaded if not
    cached (a wheel is a zip; namespace packages such as ledataset do not import from one). Skips
    the calling test, naming the command, where the package index cannot be reached."""
    name, _, version = requirement.partition("==")
    folder = os.path.join(os.path.dirname(storage.cache_dir()), "wheels")
    prefix = f"{name.replace('-', '_')}-{version}-"
    found = [f for f in os.listdir(folder) if f.startswith(prefix) and f.endswith(".whl")] \
        if os.path.isdir(folder) else []
    if not found:
        run = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", folder, requirement],
                             capture_output=True, text=True)
        found = [f for f in os.listdir(folder) if f.startswith(prefix) and f.endswith(".whl")] \
            if os.path.isdir(folder) else []
        if run.returncode or not found:
            pytest.skip(f"cannot fetch the reference package: pip download --no-deps {requirement} failed: "
                        f"{run.stderr[-500:]}")
    unpacked = os.path.join(folder, found[0].removesuffix(".whl"))
    if not os.path.isdir(unpacked):
        tmp = f"{unpacked}.{os.getpid()}.tmp"
        with zipfile.ZipFile(os.path.join(folder, found[0])) as z:
            z.extractall(tmp)
        os.replace(tmp, unpacked)
    return unpacked
