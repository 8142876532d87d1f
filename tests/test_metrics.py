"""vla/metrics.py, read back by each format's own reader: TensorBoard's EventAccumulator, W&B's
record schema, and a gs:// workdir on the GCS emulator (the `gcs` fixture, tests/gcs_emulator.py).
After a resume every file holds each step once."""
import json
import os
import struct
import sys
import types
import warnings

import pytest
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

from configs import demo, specs
from data import storage
from vla.metrics import MetricsSpec, MetricsWriter

# TensorBoard's own switch to its TensorFlow stub (what its no_tensorflow build sets): reading
# event files must not import TensorFlow into a test process that also loads MuJoCo.
sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def _scalars(logdir) -> dict[str, list[tuple[int, float, float]]]:
    """tag -> [(step, value, wall_time)] of every event in logdir, in file order. Without
    TensorBoard's purge of out-of-order steps, so nothing written twice is hidden."""
    acc = EventAccumulator(os.fspath(logdir), purge_orphaned_data=False)
    acc.Reload()
    return {tag: [(e.step, e.value, e.wall_time) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _write(writer: MetricsWriter, steps, offset: float = 0.0) -> None:
    for step in steps:
        writer.write(step, {"loss": step + offset, "lr": 0.5})


def test_a_resume_leaves_each_step_once_in_tensorboard_and_jsonl(tmp_path):
    first = MetricsWriter(str(tmp_path), True)
    _write(first, range(1, 11))
    first.close()
    before = _scalars(tmp_path / "tensorboard")["loss"]
    again = MetricsWriter(str(tmp_path), True, 6)  # restored at 6: steps 7..10 run again
    _write(again, range(7, 11), offset=100.0)
    again.close()

    scalars = _scalars(tmp_path / "tensorboard")
    assert sorted(scalars) == ["loss", "lr"]
    for events in scalars.values():
        assert [step for step, _, _ in events] == list(range(1, 11))
    assert [v for _, v, _ in scalars["loss"]] == [*range(1, 7), *range(107, 111)]
    assert scalars["loss"][:6] == before[:6]  # kept events keep their wall times
    assert len(os.listdir(tmp_path / "tensorboard")) == 1
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(s, s + (100.0 if s > 6 else 0.0)) for s in range(1, 11)]


def test_older_event_files_are_merged_and_torn_tails_dropped(tmp_path):
    """A workdir of the old writer (a new event file at every start) killed mid-write: the newer
    file supersedes the older from its first step on; half a line or record is ignored."""
    logdir = tmp_path / "tensorboard"
    logdir.mkdir()
    for name, steps, offset in (("events.out.tfevents.1000.000000.h.1", range(1, 11), 0.0),
                                ("events.out.tfevents.2000.000000.h.2", range(7, 10), 100.0)):
        with open(logdir / name, "wb") as f:
            w = RecordWriter(f)
            w.write(event_pb2.Event(wall_time=1.0, file_version="brain.Event:2").SerializeToString())
            for s in steps:
                summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag="loss", simple_value=s + offset)])
                w.write(event_pb2.Event(wall_time=float(s), step=s, summary=summary).SerializeToString())
            f.write(struct.pack("<Q", 50) + b"\x00" * 10)  # a record cut short
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": s}) + "\n" for s in range(1, 9))
                                            + '{"step": 9, "lo')
    writer = MetricsWriter(str(tmp_path), True, 8)
    _write(writer, [9], offset=200.0)
    writer.close()
    assert [(s, v) for s, v, _ in _scalars(logdir)["loss"]] == [(1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (6, 6),
                                                                (7, 107), (8, 108), (9, 209)]
    assert len(os.listdir(logdir)) == 1
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == \
        list(range(1, 10))


def test_a_gs_workdir_is_rewritten_whole_never_appended(gcs, tmp_path):
    workdir = gcs.bucket("metrics") + "/run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for resume, steps, offset in ((0, range(1, 6), 0.0), (3, range(4, 8), 100.0)):
            writer = MetricsWriter(workdir, True, resume)
            _write(writer, steps, offset)
            writer.plot(storage.join(workdir, "loss.png"))
            writer.close()
    assert not [w for w in caught if "Append mode" in str(w.message)]
    remote = storage.fresh(workdir)
    rows = [json.loads(line) for line in (remote / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1), (2, 2), (3, 3), (4, 104), (5, 105), (6, 106), (7, 107)]
    assert (remote / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    local = tmp_path / "tensorboard"
    storage.copy_tree(remote / "tensorboard", local)
    assert len(os.listdir(local)) == 1
    assert [(s, v) for s, v, _ in _scalars(local)["loss"]] == [(r["step"], r["loss"]) for r in rows]
    assert not os.path.exists("gs:")  # nothing misrouted to a local folder


def _wandb_records(run_file) -> list:
    """The records of an offline run's .wandb file, decoded with W&B's protobuf schema (wandb
    0.31 ships no Python reader). The file is a LevelDB-style log: a 7-byte W&B header, then
    32 KiB blocks of chunks (CRC u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's zero padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


def _wandb_fragments(wandb_dir) -> list[tuple]:
    """(run record, [(step, loss)]) of each offline run under wandb_dir, oldest first."""
    out = []
    for run_file in (wandb_dir / "wandb").glob("offline-run-*/run-*.wandb"):
        records = _wandb_records(run_file)
        (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
                   for r in records if r.WhichOneof("record_type") == "history"]
        out.append((run, [(h["_step"], h["loss"]) for h in history]))
    return sorted(out, key=lambda fragment: fragment[0].start_time.ToNanoseconds())


def test_wandb_gets_the_rows_and_a_resume_continues_the_run_without_going_back(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    for key, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true",
                       "WANDB_CONSOLE": "off"}.items():
        monkeypatch.setenv(key, value)
    workdir, spec = str(tmp_path / "my-run"), MetricsSpec(wandb_project="vla-test", wandb_tags=("t",))
    for resume, steps, offset in ((0, range(1, 6), 0.0), (3, range(4, 9), 100.0)):
        writer = MetricsWriter(workdir, True, resume, spec, {"seed": 7})
        _write(writer, steps, offset)
        writer.close()

    wandb.teardown()  # wandb-core writes the run files behind finish(); this waits for them
    (run1, history1), (run2, history2) = _wandb_fragments(tmp_path)
    assert run1.run_id == run2.run_id == (tmp_path / "my-run" / "wandb_run_id").read_text()
    assert (run1.project, run1.display_name, list(run1.tags)) == ("vla-test", "my-run", ["t"])
    config = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in run1.config.update}
    assert config["seed"] == 7
    assert history1 == [(s, s) for s in range(1, 6)]
    # Replayed steps 4 and 5 stay as W&B has them; only later steps are sent.
    assert history2 == [(6, 106), (7, 107), (8, 108)]


def test_wandb_is_imported_only_for_a_project_and_its_keys_are_read_once(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # any `import wandb` raises ImportError
    writer = MetricsWriter(str(tmp_path), True)
    _write(writer, [1])
    writer.close()
    assert not (tmp_path / "wandb_run_id").exists()

    config = demo.get_config()
    assert specs.build(config).metrics == MetricsSpec()
    config.metrics.wandb_project, config.metrics.wandb_mode = "p", "offline"
    config.metrics.wandb_tags = ["a", "b"]  # a config.json read back gives lists
    assert specs.build(config).metrics == MetricsSpec(wandb_project="p", wandb_mode="offline", wandb_tags=("a", "b"))
    config.metrics.wandb_mode = "shared"
    with pytest.raises(ValueError, match="metrics.wandb_mode='shared'"):
        specs.build(config)
    del config["metrics"]  # a run configured before the section existed
    assert specs.build(config).metrics == MetricsSpec()
