"""Cloud storage for real: paths through data/storage.py, and a run that trains, is killed,
resumes and exports entirely on gs:// paths of a GCS API emulator (tests/gcs_emulator.py)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from data import storage
from tests.data_fixtures import TINY_FAST_VOCAB, TINY_IMAGE_SIZE, TINY_TASKS
from vla import bundle

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("url", ["s3://bucket/run", "gs:/bucket/run", "http://host/run", "file:///tmp/x"])
def test_a_scheme_we_cannot_write_is_refused_not_made_a_local_folder(url):
    with pytest.raises(ValueError, match="unsupported storage URL"):
        storage.path(url)


def test_local_paths_are_absolute_and_unwritable_ones_fail_naming_the_path(tmp_path):
    assert os.fspath(storage.path("runs/x")) == os.path.abspath("runs/x")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OSError, match=f"cannot write to '{blocker}/run'"):
        storage.check_writable(blocker / "run")


def test_stage_copies_a_gs_tree_once_and_copy_tree_uploads(gcs, tmp_path, monkeypatch):
    monkeypatch.setenv("VLA_DATA_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "x.bin").write_bytes(b"\x00" * 1000)
    (src / "y.txt").write_text("hello")
    url = gcs.bucket("stage") + "/root"
    storage.copy_tree(src, url)
    local = storage.stage(url)
    assert local == str(tmp_path / "cache" / "stage" / "root")
    assert open(os.path.join(local, "a", "x.bin"), "rb").read() == b"\x00" * 1000
    assert open(os.path.join(local, "y.txt")).read() == "hello"
    before = os.stat(os.path.join(local, "y.txt")).st_mtime_ns
    assert storage.stage(url) == local  # same sizes: nothing fetched again
    assert os.stat(os.path.join(local, "y.txt")).st_mtime_ns == before


def _trainer(workdir: str, data_root: str, total_steps: int) -> list[str]:
    """The trainer on the tiny generated data (tests/data_fixtures.py), from the command line."""
    overrides = {
        "data.root": data_root, "data.tasks": repr(TINY_TASKS), "data.episodes_per_task": 2,
        "data.heldout_episodes_per_task": 1, "model.image_size": TINY_IMAGE_SIZE,
        "data.fast_targets": True, "data.fast_vocab_size": TINY_FAST_VOCAB, "batch_size": 8,
        "total_steps": total_steps, "log_every": 1, "checkpoint_every": 2, "eval_every": 1000,
        "eval_batches": 1, "chip": "h100", "knobs.flow_steps": 2, "optimizer.warmup_steps": 2,
    }
    return [sys.executable, "-m", "vla.train", "--config", "configs/demo.py", "--workdir", workdir,
            *(f"--config.{k}={v}" for k, v in overrides.items())]


def _wait_for(predicate, process: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.time() + timeout_s
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(f"trainer exited with {process.returncode} before the condition held")
        if time.time() > deadline:
            process.kill()
            raise AssertionError("timed out")
        time.sleep(0.2)


def test_train_kill_resume_export_entirely_on_gs(gcs, generated_root, tmp_path):
    bucket = gcs.bucket("run")
    data_root, workdir, out = f"{bucket}/data", f"{bucket}/demo", f"{bucket}/bundle"
    storage.copy_tree(generated_root, data_root)
    env = dict(os.environ, VLA_DATA_CACHE=str(tmp_path / "cache"))
    logs = open(tmp_path / "train.log", "wb")

    first = subprocess.Popen(_trainer(workdir, data_root, 6), cwd=REPO, env=env, stdout=logs, stderr=logs)
    # fresh: gcsfs would otherwise answer from this process's cached listings
    checkpoints = lambda: storage.fresh(workdir) / "checkpoints"  # noqa: E731
    _wait_for(lambda: (checkpoints() / "2" / "commit_success.txt").exists(), first)
    first.send_signal(signal.SIGKILL)
    first.wait()

    second = subprocess.run(_trainer(workdir, data_root, 6), cwd=REPO, env=env, stdout=logs, stderr=logs,
                            timeout=600)
    assert second.returncode == 0, (tmp_path / "train.log").read_text()[-3000:]
    rows = [json.loads(line) for line in (storage.fresh(workdir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert json.loads((storage.path(workdir) / "config.json").read_text())["total_steps"] == 6
    assert {p.name for p in checkpoints().iterdir()} >= {"2", "6"}
    assert (storage.path(workdir) / "loss.png").stat().length > 0
    assert not os.path.exists(os.path.join(REPO, "gs:"))  # nothing misrouted to a local folder

    bundle.export(workdir, out, progress=lambda line: None)
    assert bundle.read_json(out, bundle.METADATA_FILE)["step"] == 6
    assert bundle.read_params(out) and bundle.read_exported(out)
