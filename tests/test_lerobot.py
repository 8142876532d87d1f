"""LeRobot datasets (data/lerobot.py reader, data/lerobot_export.py writer).

Fixtures: ../shared/fixtures/lerobot, datasets written by LeRobot itself (0.3.3: v2.1; 0.4.4:
v3.0), whose content scripts/gen.py regenerates exactly. The reference loader is LeRobot's own
dataset code as PyPI's `lerobot-dataset` packages it (import `ledataset`), run in a child
process by tools/reference_loaders.py (which says how and why).
"""
from __future__ import annotations

import importlib.util
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data import lerobot, lerobot_export, rlds, storage, video_clips
from data.lerobot import LeRobotDataset
from data.rlds import CorruptRecordError
from tools import reference_loaders

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "lerobot"
FOLDERS = sorted(p.name for p in FIXTURES.glob("lerobot0*")) if FIXTURES.is_dir() else []
needs_fixtures = pytest.mark.skipif(not FOLDERS, reason=f"no LeRobot fixtures under {FIXTURES}")
SPEC = dict(name="fixture", camera_keys={"observation.images.top": "top", "observation.images.wrist": "wrist"},
            state_keys=("observation.state",), action_keys=("action",), instruction_key="task")
CAMS = {"observation.images.top": "top", "observation.images.wrist": "wrist"}
VIDEO_MAE, VIDEO_MAX = 5.0, 7.0  # 0-255 scale; the fixtures' README: about 3 for AV1 (h264 ~4.4 here)


@pytest.fixture(scope="module")
def gen():
    """scripts/gen.py: the exact content every fixture was written from."""
    spec = importlib.util.spec_from_file_location("lerobot_fixture_gen", FIXTURES / "scripts" / "gen.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _copy(name: str, tmp_path: Path) -> str:
    """A private copy of a fixture (the reader writes its index beside the data; per-process
    file caches are keyed by path, so tests that alter files use fresh paths)."""
    dst = tmp_path / name
    shutil.copytree(FIXTURES / name, dst, ignore=shutil.ignore_patterns(storage.INDEX_DIR))
    return str(dst)


@pytest.fixture(scope="module")
def fixture_copies(tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("lerobot_fixtures")
    return {name: _copy(name, tmp) for name in FOLDERS}


def _frame_errors(got: np.ndarray, want: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-frame mean |diff| to the true frame, to the previous and to the next true frame."""
    got, want = got.astype(np.float32), want.astype(np.float32)
    mae = lambda a, b: np.abs(a - b).mean(axis=(1, 2, 3))
    return mae(got, want), mae(got[1:], want[:-1]), mae(got[:-1], want[1:])


def _check_frames(name: str, got: np.ndarray, want: np.ndarray) -> None:
    if "video" not in name:
        assert np.array_equal(got, want), f"{name}: PNG frames differ"
        return
    err, prev, nxt = _frame_errors(got, want)
    assert err.mean() < VIDEO_MAE and err.max() < VIDEO_MAX, (name, err.mean(), err.max())
    # The nearest frame, not a neighbour: each decoded frame is much closer to its own frame.
    assert (err[1:] < 0.8 * prev).all() and (err[:-1] < 0.8 * nxt).all(), name


# ------------------------------------------------------------------------------ fixtures read back
@needs_fixtures
@pytest.mark.parametrize("name", FOLDERS)
def test_fixture_reads_back_exactly(name, fixture_copies, gen):
    ds = LeRobotDataset(fixture_copies[name], SPEC)
    assert ds.version == ("v2.1" if "v21" in name else "v3.0")
    assert ds.control_hz == gen.FPS and len(ds) == len(gen.LENGTHS)
    assert ds.episode_lengths.tolist() == gen.LENGTHS and ds.episode_lengths.dtype == np.int64
    assert ds.cameras == CAMS and (ds.state_dim, ds.action_dim) == (4, 4)
    for e in range(len(ds)):
        truth, ep = gen.episode(e), ds.episode(e)
        assert ep.length == truth["n"] and ep.instruction == truth["task"] and ep.control_hz == gen.FPS
        out = ep.steps(range(ep.length))
        assert out["state"].dtype == np.float32 and np.array_equal(out["state"], truth["state"])
        assert np.array_equal(out["actions"], truth["action"])
        for key, cam in CAMS.items():
            assert out["images"][cam].dtype == np.uint8
            _check_frames(name, out["images"][cam], truth["imgs"][key])
        assert ds.file_of(e).endswith(".parquet") and os.path.isfile(ds.file_of(e))


@needs_fixtures
@pytest.mark.parametrize("name", [n for n in FOLDERS if "v30_video" in n or "v21_video" in n])
def test_random_access_gives_the_same_frames_as_a_full_read(name, fixture_copies):
    ds = LeRobotDataset(fixture_copies[name], SPEC)
    ep = ds.episode(3)
    full = ep.steps(range(ep.length))
    order = [33, 2, 2, 17, 0, 39]  # any order, repeats, both ends
    part = ds.episode(3).steps(order)
    for cam in full["images"]:
        assert np.array_equal(part["images"][cam], full["images"][cam][order])
    assert np.array_equal(part["state"], full["state"][order])
    with pytest.raises(IndexError, match="out of range"):
        ep.steps([ep.length])


@needs_fixtures
def test_lowdim_decodes_no_frame_and_matches_steps(fixture_copies, monkeypatch):
    ds = LeRobotDataset(fixture_copies["lerobot044_v30_video"], SPEC)
    full = ds.episode(2).steps(range(ds.episode(2).length))
    monkeypatch.setattr(video_clips, "decode_frames", lambda *a: pytest.fail("lowdim decoded a video"))
    monkeypatch.setattr(lerobot, "_decode_image", lambda *a: pytest.fail("lowdim decoded an image"))
    for low in (ds.episode(2).lowdim(), ds.lowdim(2)):
        assert set(low) == {"state", "actions"}
        assert np.array_equal(low["state"], full["state"]) and np.array_equal(low["actions"], full["actions"])


@needs_fixtures
def test_picklable_and_splits(fixture_copies, tmp_path):
    ds = pickle.loads(pickle.dumps(LeRobotDataset(fixture_copies["lerobot044_v30_png"], SPEC)))
    assert ds.episode(1).steps([0])["images"]["top"].shape == (1, 64, 64, 3)
    root = _copy("lerobot044_v30_png", tmp_path)
    info_path = os.path.join(root, "meta", "info.json")
    info = json.load(open(info_path))
    info["splits"] = {"train": "0:4", "val": "4:6"}
    json.dump(info, open(info_path, "w"))
    assert lerobot.splits(root) == ["train", "val"]
    val = LeRobotDataset(root, SPEC, split="val")
    assert len(val) == 2 and val.episode_lengths.tolist() == [24, 36]
    assert val.episode(1).instruction == "press the button"  # LeRobot episode 5
    with pytest.raises(ValueError, match=r"no split 'heldout'.*\['train', 'val'\]"):
        LeRobotDataset(root, SPEC, split="heldout")


# ------------------------------------------------------------------------------ the episode index
@needs_fixtures
def test_index_is_cached_and_invalidated_by_a_changed_file(tmp_path, monkeypatch):
    root = _copy("lerobot044_v30_video", tmp_path)
    first = LeRobotDataset(root, SPEC)
    assert os.path.isfile(os.path.join(root, storage.INDEX_DIR, f"{lerobot.INDEX_NAME}.json"))

    def no_reading(*args, **kwargs):
        raise AssertionError("a second open read a parquet table or a video")
    with monkeypatch.context() as m:
        for name in ("read_table", "read_schema", "ParquetFile"):
            m.setattr(pq, name, no_reading)
        m.setattr(lerobot.av, "open", no_reading)
        again = LeRobotDataset(root, SPEC)
    assert again.episode_lengths.tolist() == first.episode_lengths.tolist()

    reads = []
    real = pq.read_table
    monkeypatch.setattr(pq, "read_table", lambda *a, **k: reads.append(a[0]) or real(*a, **k))
    episodes = os.path.join(root, "meta", "episodes", "chunk-000", "file-000.parquet")
    os.utime(episodes, ns=(1, 1))  # the same content, another modification time: a changed file
    LeRobotDataset(root, SPEC)
    assert episodes in reads


# ------------------------------------------------------------------------------ bad input
def test_not_a_lerobot_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LeRobotDataset(str(tmp_path / "nowhere"), SPEC)
    with pytest.raises(ValueError, match=r"is not a LeRobot dataset: no meta/info.json"):
        LeRobotDataset(str(tmp_path), SPEC)


@needs_fixtures
def test_unsupported_codebase_version(tmp_path):
    root = _copy("lerobot044_v30_png", tmp_path)
    info_path = os.path.join(root, "meta", "info.json")
    info = json.load(open(info_path))
    info["codebase_version"] = "v1.6"
    json.dump(info, open(info_path, "w"))
    with pytest.raises(ValueError, match=r"info.json: codebase_version 'v1.6' is not supported.*v2.1.*v3.0.*convert"):
        LeRobotDataset(root, SPEC)


@needs_fixtures
def test_spec_key_missing_lists_the_features(fixture_copies):
    root = fixture_copies["lerobot044_v30_png"]
    with pytest.raises(ValueError, match=r"keys \['observation.joints'\] are not features of LeRobot dataset "
                                         r".*lerobot044_v30_png.*features: \['action', "):
        LeRobotDataset(root, {**SPEC, "state_keys": ("observation.joints",)})
    with pytest.raises(ValueError, match=r"\['language_instruction'\].*instruction_key='task'"):
        LeRobotDataset(root, {k: v for k, v in SPEC.items() if k != "instruction_key"})
    with pytest.raises(ValueError, match=r"none of its camera keys \['image'\].*observation.images.top"):
        LeRobotDataset(root, {**SPEC, "camera_keys": {"image": "base"}})


@needs_fixtures
@pytest.mark.parametrize("name", ["lerobot033_v21_video", "lerobot044_v30_video"])
def test_video_shorter_than_its_episode(name, tmp_path):
    root = _copy(name, tmp_path)
    short = FIXTURES / "lerobot033_v21_video" / "videos" / "chunk-000" / "observation.images.top" / "episode_000000.mp4"
    if name.startswith("lerobot033"):  # episode 3 (40 rows) gets episode 0's 20-frame video
        bad, episode, frames, rows = "videos/chunk-000/observation.images.top/episode_000003.mp4", 3, 20, 40
    else:  # the one mp4 of all episodes replaced by 20 frames: episode 1 (from 1.0 s) has none
        bad, episode, frames, rows = "videos/observation.images.top/chunk-000/file-000.mp4", 1, 0, 27
    shutil.copy(short, os.path.join(root, bad))
    ds = LeRobotDataset(root, SPEC)
    ds.episode(0)  # intact in both
    message = rf"video .*{bad}.* holds {frames} frames .* the table has {rows} rows"
    with pytest.raises(CorruptRecordError, match=message):
        ds.episode(episode)


@needs_fixtures
def test_corrupt_parquet_file_and_rows(tmp_path):
    root = _copy("lerobot044_v30_png", tmp_path / "truncated")
    data = os.path.join(root, "data", "chunk-000", "file-000.parquet")
    with open(data, "r+b") as f:
        f.truncate(os.path.getsize(data) // 2)  # footer gone
    ds = LeRobotDataset(root, SPEC)  # the index needs meta/ only
    with pytest.raises(CorruptRecordError, match=r"episode 2 \(file .*file-000.parquet\)") as e:
        ds.episode(2).steps([0])
    assert e.value.file == data and e.value.episode == 2

    root = _copy("lerobot044_v30_png", tmp_path / "rows")
    data = os.path.join(root, "data", "chunk-000", "file-000.parquet")
    table = pq.read_table(data)
    state = table.column("observation.state").to_pylist()
    state[25] = None  # episode 1, step 5
    images = table.column("observation.images.top").to_pylist()
    images[50]["bytes"] = b"not a png"  # episode 2, step 3
    table = table.set_column(table.schema.get_field_index("observation.state"), "observation.state",
                             pa.array(state, table.schema.field("observation.state").type))
    table = table.set_column(table.schema.get_field_index("observation.images.top"), "observation.images.top",
                             pa.array(images, table.schema.field("observation.images.top").type))
    pq.write_table(table, data, row_group_size=20)
    ds = LeRobotDataset(root, SPEC)
    ds.episode(0).steps(range(20))
    with pytest.raises(CorruptRecordError, match=r"episode 1 .*column 'observation.state' is null"):
        ds.episode(1).lowdim()
    with pytest.raises(CorruptRecordError, match=r"episode 2, step 3 \(file .*file-000.parquet\)") as e:
        ds.episode(2).steps([1, 3])
    assert e.value.step == 3
    assert ds.episode(2).steps([1, 2])["images"]["top"].shape == (2, 64, 64, 3)


# ------------------------------------------------------------------------------ export
@pytest.fixture(scope="module")
def tiny_rlds(tmp_path_factory) -> dict:
    """A 3-episode RLDS dataset at 20 Hz written with data/rlds.py: two 64² cameras of smooth
    images (so that video compression leaves each frame nearest its own), subtasks per step."""
    def smooth(rng, n):
        keys = rng.uniform(0, 255, size=(n // 8 + 2, 4, 4, 3))
        frames = []
        for t in range(n):
            i, f = int(t // 8), (t % 8) / 8
            low = ((1 - f) * keys[i] + f * keys[i + 1]).astype(np.uint8)
            frames.append(np.asarray(Image.fromarray(low).resize((64, 64), Image.BICUBIC)))
        return np.stack(frames)

    lengths, episodes, truth = [12, 17, 9], [], []
    for e, n in enumerate(lengths):
        rng = np.random.default_rng(e)
        ep = dict(state=rng.normal(size=(n, 4)).astype(np.float32),
                  actions=rng.uniform(-1, 1, (n, 4)).astype(np.float32),
                  images={"corner2": smooth(rng, n), "gripperPOV": smooth(rng, n)}, instruction=f"task {e % 2}",
                  subtask=[f"phase {i // 5}" for i in range(n)])
        truth.append(ep)
        episodes.append(rlds.rlds_episode({c: list(f) for c, f in ep["images"].items()}, ep["state"], ep["actions"],
                                          np.zeros(n), ep["instruction"], "t", True, e, ep["subtask"]))
    path = str(tmp_path_factory.mktemp("rlds") / "tiny")
    rlds.write_tfds(path, rlds.robot_features(["corner2", "gripperPOV"], 64, 4, 4, subtasks=True),
                    {"train": episodes}, {"control_hz": 20, "episode_lengths": {"train": lengths}}, "tiny")
    return {"path": path, "episodes": truth}


EXPORTS = [("v3.0", True, "libsvtav1"), ("v3.0", True, "h264"), ("v3.0", False, None), ("v2.1", True, "libsvtav1"),
           ("v2.1", False, None)]


@pytest.fixture(scope="module")
def exports(tiny_rlds, tmp_path_factory) -> dict:
    out = {}
    for version, video, codec in EXPORTS:
        path = str(tmp_path_factory.mktemp("export") / f"{version}_{codec or 'png'}")
        out[(version, codec)] = lerobot_export.export(tiny_rlds["path"], path, codebase_version=version, video=video,
                                                      vcodec=codec or "h264")
    return out


def _check_export_frames(key, got: np.ndarray, want: np.ndarray) -> None:
    _check_frames("png" if key[1] is None else "video", got, want)


@pytest.mark.parametrize("key", [(v, c) for v, _, c in EXPORTS])
def test_export_reads_back_through_our_reader(key, exports, tiny_rlds):
    report = exports[key]
    assert (report["episodes"], report["frames"], report["tasks"], report["fps"]) == (3, 38, 2, 20)
    ds = LeRobotDataset(report["path"], report["spec"])
    assert ds.version == key[0] and ds.control_hz == 20 and ds.episode_lengths.tolist() == [12, 17, 9]
    assert ds.spec.hold_dims == (3,)  # the metaworld gripper travels into the spec
    for e, truth in enumerate(tiny_rlds["episodes"]):
        ep = ds.episode(e)
        out = ep.steps(range(ep.length))
        assert np.array_equal(out["state"], truth["state"]) and np.array_equal(out["actions"], truth["actions"])
        assert ep.instruction == truth["instruction"] and out["subtask"] == truth["subtask"]
        for cam, frames in truth["images"].items():
            _check_export_frames(key, out["images"][cam], frames)


def test_export_refuses_to_overwrite_and_bad_options(exports, tiny_rlds, tmp_path):
    with pytest.raises(FileExistsError, match="exists"):
        lerobot_export.export(tiny_rlds["path"], exports[("v3.0", None)]["path"])
    with pytest.raises(ValueError, match="codebase_version 'v2.0'"):
        lerobot_export.export(tiny_rlds["path"], str(tmp_path / "x"), codebase_version="v2.0")
    with pytest.raises(ValueError, match="vcodec 'vp9'"):
        lerobot_export.export(tiny_rlds["path"], str(tmp_path / "x"), vcodec="vp9")


# ------------------------------------------------------------------------------ the reference loader
@pytest.fixture(scope="module")
def reference_reads(fixture_copies, exports, tmp_path_factory) -> dict:
    """{name: what LeRobot's loader reads}: the v3.0 fixtures (0.4.4 reads no v2.1) and our v3.0 exports."""
    roots = {n: fixture_copies[n] for n in FOLDERS if "v30" in n}
    roots.update({f"export_{codec or 'png'}": r["path"] for (v, codec), r in exports.items() if v == "v3.0"})
    out = tmp_path_factory.mktemp("reference")
    try:
        reference_loaders.lerobot("read", [json.dumps(roots), str(out)], str(out), timeout=600)
    except RuntimeError as e:
        if "pip download" in str(e):
            pytest.skip(f"cannot fetch the reference package: {e}")
        raise
    return {n: dict(np.load(out / f"{n}.npz")) for n in roots}


def _same_as_reference(ds: LeRobotDataset, ref: dict) -> None:
    starts = np.concatenate([[0], np.cumsum(ds.episode_lengths)])
    assert len(ref["episode_index"]) == starts[-1] and int(ref["fps"]) == ds.control_hz
    for e in range(len(ds)):
        rows = slice(starts[e], starts[e + 1])
        assert (ref["episode_index"][rows] == e).all()
        assert (ref["frame_index"][rows] == np.arange(ds.episode_lengths[e])).all()
        ep = ds.episode(e)
        out = ep.steps(range(ep.length))
        assert np.array_equal(out["state"], ref["observation.state"][rows])
        assert np.array_equal(out["actions"], ref["action"][rows])
        assert set(ref["task"][rows]) == {ep.instruction}
        for key, cam in ds.cameras.items():
            # Same frame, same decoder: bit-exact, video included (a neighbour would differ).
            assert np.array_equal(out["images"][cam], ref["image:" + key][rows]), (e, cam)


@needs_fixtures
@pytest.mark.parametrize("name", [n for n in FOLDERS if "v30" in n])
def test_fixture_matches_the_reference_loader(name, fixture_copies, reference_reads):
    _same_as_reference(LeRobotDataset(fixture_copies[name], SPEC), reference_reads[name])


@pytest.mark.parametrize("codec", ["libsvtav1", "h264", None])
def test_export_loads_in_the_reference_loader(codec, exports, tiny_rlds, reference_reads):
    report, ref = exports[("v3.0", codec)], reference_reads[f"export_{codec or 'png'}"]
    starts = np.concatenate([[0], np.cumsum([len(t["state"]) for t in tiny_rlds["episodes"]])])
    for e, truth in enumerate(tiny_rlds["episodes"]):
        rows = slice(starts[e], starts[e + 1])
        assert np.array_equal(ref["observation.state"][rows], truth["state"])
        assert np.array_equal(ref["action"][rows], truth["actions"])
        assert set(ref["task"][rows]) == {truth["instruction"]}
        for cam, frames in truth["images"].items():
            _check_export_frames(("v3.0", codec), ref[f"image:observation.images.{cam}"][rows], frames)
    _same_as_reference(LeRobotDataset(report["path"], report["spec"]), ref)
