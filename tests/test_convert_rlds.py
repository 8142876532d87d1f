"""TFRecord -> ArrayRecord conversion (data/convert_rlds.py, tools/convert.py) on datasets with the
real bridge and fractal feature structures, written by TFDS's own TFRecord writer."""
import io
import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from data import convert_rlds
from data.convert_rlds import ConversionError
from data.rlds import RobotDataset
from data.robots import get_spec
from data.tfds_image_text import FieldMap, ImageTextSource
from tools.oxe_features import bridge_features, droid_features, fractal_features

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
f = tfds.features


# ------------------------------------------------------------------ feature structures
# bridge, fractal and droid as the TFDS catalog states them: tools/oxe_features.py.
def image_text_features() -> f.FeaturesDict:
    """coco_captions' layout (a '/' inside a key, a Sequence of dicts) plus a ClassLabel, whose
    names TFDS keeps in a label file beside features.json."""
    return f.FeaturesDict({
        "image": f.Image(encoding_format="jpeg"), "image/id": f.Scalar(dtype=np.int64),
        "captions": f.Sequence({"id": f.Scalar(dtype=np.int64), "text": f.Text()}),
        "label": f.ClassLabel(names=["cup", "spoon", "towel"]),
    })


# ------------------------------------------------------------------ example values
def _frame(rng: np.random.Generator, shape: tuple) -> np.ndarray:
    h, w, _ = shape
    base = np.add.outer(np.arange(h), np.arange(w))[..., None] + rng.integers(0, 255, (1, 1, 3))
    return ((base + rng.integers(0, 8, shape)) % 256).astype(np.uint8)


def _leaf(feature, rng):
    if isinstance(feature, f.FeaturesDict):
        return {k: _leaf(v, rng) for k, v in feature.items()}
    if isinstance(feature, f.Image):
        return _frame(rng, feature.shape)
    dtype = np.dtype(feature.np_dtype)  # .dtype is a tf.DType once TensorFlow is imported
    if dtype == np.bool_:
        return bool(rng.integers(2))
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, 100, feature.shape).astype(dtype)
    if np.issubdtype(dtype, np.floating):
        return rng.normal(size=feature.shape).astype(dtype)
    return f"text {rng.integers(1000)}"


def _episode(features: f.FeaturesDict, n: int, rng: np.random.Generator) -> dict:
    episode = {k: _leaf(v, rng) for k, v in features.items() if k != "steps"}
    steps = [_leaf(features["steps"].feature, rng) for _ in range(n)]
    for i, s in enumerate(steps):
        s.update(is_first=i == 0, is_last=i == n - 1)
        if "action" in s and isinstance(s["action"], dict):  # RT-1's gripper: -1 open, +1 close
            s["action"]["gripper_closedness_action"] = np.array([rng.choice([-1.0, 0.0, 1.0])], np.float32)
    return {**episode, "steps": steps}


def _image_text_example(i: int, rng: np.random.Generator) -> dict:
    return {"image": _frame(rng, (40 + 8 * i, 56, 3)), "image/id": i, "label": i % 3,
            "captions": [{"id": 10 * i + j, "text": f"caption {i}.{j}"} for j in range(2)]}


def _skip_images(feature):
    if isinstance(feature, f.FeaturesDict):
        tree = {k: _skip_images(v) for k, v in feature.items()}
        return {k: v for k, v in tree.items() if v is not None} or None
    if isinstance(feature, f.Dataset):
        return _skip_images(feature.feature)
    return tfds.decode.SkipDecoding() if isinstance(feature, f.Image) else None


# ------------------------------------------------------------------ building (in a TF child)
DATASETS = {  # name: (features, {split: number of examples}, shards per split)
    "bridge": (bridge_features, {"train": 4, "val": 2}, 2),
    "fractal20220817_data": (fractal_features, {"train": 3}, 2),
    "coco_captions": (image_text_features, {"train": 5}, 2),
}


def build_sources(root: str) -> None:
    """Writes every DATASETS entry as TFRecord through TFDS (needs TensorFlow) into root/<name>/
    0.1.0, then pickles what was written and what tf.data reads back (images left encoded)."""
    import tensorflow as tf  # noqa: F401  (TFDS writes TFRecord through it)

    tfds.display_progress_bar(False)
    for name, (make, splits, shards) in DATASETS.items():
        features, rng = make(), np.random.default_rng(len(name))
        written = {split: [_image_text_example(i, rng) if name == "coco_captions" else
                           _episode(features, 2 + i, rng) for i in range(n)] for split, n in splits.items()}
        builder = tfds.dataset_builders.store_as_tfds_dataset(
            name, "0.1.0", features, {s: list(enumerate(ex)) for s, ex in written.items()},
            data_dir=root, file_format="tfrecord", download_config=tfds.download.DownloadConfig(num_shards=shards))
        read = {}
        for split in splits:
            ds = builder.as_dataset(split=split, shuffle_files=False, decoders=_skip_images(features))
            read[split] = [{**tfds.as_numpy({k: v for k, v in ex.items() if k != "steps"}),
                            **({"steps": list(tfds.as_numpy(ex["steps"]))} if "steps" in ex else {})}
                           for ex in ds]
        with open(os.path.join(root, f"{name}.pkl"), "wb") as fh:
            pickle.dump({"written": written, "read": read}, fh)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict:
    """{name: (TFRecord dataset dir, {"written", "read"})}; a metadata.json of its own in bridge."""
    root = str(tmp_path_factory.mktemp("tfrecord"))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, "-c", f"from tests.test_convert_rlds import build_sources; "
                          f"build_sources({root!r})"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    with open(os.path.join(root, "bridge", "0.1.0", "metadata.json"), "w") as fh:
        json.dump({"source": "OXE"}, fh)
    out = {}
    for name in DATASETS:
        with open(os.path.join(root, f"{name}.pkl"), "rb") as fh:
            out[name] = (os.path.join(root, name, "0.1.0"), pickle.load(fh))
    return out


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory) -> dict:
    """Every source converted once: {name: (out dir, report)} (bridge through the process pool)."""
    root = tmp_path_factory.mktemp("array_record")
    return {name: (str(root / name), convert_rlds.convert(src, str(root / name), progress=False,
                                                          workers=2 if name == "bridge" else 1))
            for name, (src, _) in sources.items()}


# ------------------------------------------------------------------ tests
def test_tfrecord_datasets_are_refused_with_the_convert_command(sources):
    """RobotDataset and ImageTextSource (both through data.rlds.open_builder) name the dataset
    and the command instead of TFDS's 'random access ... TFRECORD is not supported'."""
    src = sources["bridge"][0]
    with pytest.raises(ValueError, match="python -m tools.convert rlds --src") as e:
        RobotDataset(src, "bridge", "train")
    assert src in str(e.value)
    with pytest.raises(ValueError, match="python -m tools.convert rlds --src"):
        ImageTextSource(sources["coco_captions"][0], fields=FieldMap())


def _assert_same(a, b, where: str) -> None:
    if isinstance(b, dict):
        assert sorted(a) == sorted(b), where
        for k in b:
            _assert_same(a[k], b[k], f"{where}/{k}")
    else:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=where)


@pytest.mark.parametrize("name", ["bridge", "fractal20220817_data"])
def test_every_record_reads_back_as_tf_data_read_the_tfrecord(sources, converted, name):
    """Every step of every episode, read with as_data_source (no TF) from the ArrayRecord copy,
    equals the TFRecord source read through tf.data; encoded images compare byte for byte."""
    src, data = sources[name]
    out, report = converted[name]
    builder = tfds.builder_from_directory(out)
    assert builder.info.file_format.value == "array_record"
    assert builder.info.features.to_json() == tfds.builder_from_directory(src).info.features.to_json()
    for split, episodes in data["read"].items():
        source = builder.as_data_source(split, decoders=_skip_images(builder.info.features))
        assert len(source) == len(episodes)
        for i, want in enumerate(episodes):
            got = source[i]
            _assert_same({k: v for k, v in got.items() if k != "steps"},
                         {k: v for k, v in want.items() if k != "steps"}, f"{split}[{i}]")
            assert len(got["steps"]) == len(want["steps"])
            for t, step in enumerate(want["steps"]):
                _assert_same(got["steps"][t], step, f"{split}[{i}] step {t}")
    shards = sorted(p for p in os.listdir(out) if ".array_record-" in p)
    assert shards[0] == f"{name}-train.array_record-00000-of-00002" and len(shards) == 2 * len(data["read"])
    assert report["converted"] == report["shards"] == len(shards) and report["skipped"] == 0
    assert report["records"] == sum(map(len, data["read"].values())) and report["mb_per_s"] > 0


def test_episode_lengths_in_metadata_keep_the_other_keys(sources, converted):
    """metadata.json gains the episode lengths per split; bridge's own metadata key survives."""
    for name in ("bridge", "fractal20220817_data"):
        metadata = tfds.builder_from_directory(converted[name][0]).info.metadata
        want = {s: [len(e["steps"]) for e in eps] for s, eps in sources[name][1]["read"].items()}
        assert metadata["episode_lengths"] == want
    assert tfds.builder_from_directory(converted["bridge"][0]).info.metadata["source"] == "OXE"


def test_feature_value_count_reads_packed_lists_off_the_wire(converted):
    """feature_value_count on a converted fractal record: packed floats (7 per step), packed
    varints (bools), bytes (one JPEG per step), and None for an absent feature."""
    from array_record.python.array_record_module import ArrayRecordReader

    out = converted["fractal20220817_data"][0]
    lengths = tfds.builder_from_directory(out).info.metadata["episode_lengths"]["train"]
    reader = ArrayRecordReader(os.path.join(out, "fractal20220817_data-train.array_record-00000-of-00002"))
    for i in range(reader.num_records()):
        record, n = reader.read([i])[0], lengths[i]
        count = convert_rlds.feature_value_count
        assert count(record, "steps/observation/base_pose_tool_reached") == 7 * n
        assert count(record, "steps/is_last") == count(record, "steps/observation/image") == n
        assert count(record, "steps/action/terminate_episode") == 3 * n
        assert count(record, "steps/no_such_feature") is None
    reader.close()


def _first_vector(episode: dict) -> bytes:
    obs = episode["steps"][0]["observation"]
    return np.asarray(obs["state"] if "state" in obs else obs["base_pose_tool_reached"]).tobytes()


def _by_read_order(data: dict, split: str) -> list[dict]:
    """The written episodes in the order the dataset holds them (TFDS shuffles at write time)."""
    written = {_first_vector(e): e for e in data["written"][split]}
    return [written[_first_vector(e)] for e in data["read"][split]]


def test_robot_dataset_reads_converted_oxe_through_the_registered_specs(sources, converted):
    """data.rlds.RobotDataset with the registered bridge and fractal specs: canonical state and
    actions are the written keys concatenated, the gripper mapped to 0 = open, 1 = closed."""
    cases = {
        "bridge": (lambda s: s["observation"]["state"],
                   lambda s: np.concatenate([s["action"][:6], 1.0 - s["action"][6:]]),
                   ("base", "right_wrist"), (256, 256, 3)),
        "fractal": (lambda s: np.concatenate([s["observation"]["base_pose_tool_reached"],
                                              s["observation"]["gripper_closed"]]),
                    lambda s: np.concatenate([s["action"]["world_vector"], s["action"]["rotation_delta"],
                                              (s["action"]["gripper_closedness_action"] + 1) / 2]),
                    ("base",), (256, 320, 3)),
    }
    for spec, (state, actions, cameras, shape) in cases.items():
        name = "bridge" if spec == "bridge" else "fractal20220817_data"
        ds = RobotDataset(converted[name][0], spec, "train")
        written = _by_read_order(sources[name][1], "train")
        assert len(ds) == len(written) and ds.control_hz == get_spec(spec).control_hz
        np.testing.assert_array_equal(ds.episode_lengths, [len(e["steps"]) for e in written])
        for i, episode in enumerate(written):
            ep = ds.episode(i)
            got = ep.steps(list(range(ep.length)))
            np.testing.assert_allclose(got["state"], [state(s) for s in episode["steps"]], rtol=1e-6)
            np.testing.assert_allclose(got["actions"], [actions(s) for s in episode["steps"]], rtol=1e-6)
            assert sorted(got["images"]) == sorted(cameras)
            assert all(v.shape == (ep.length, *shape) for v in got["images"].values())
            key = "language_instruction" if spec == "bridge" else "natural_language_instruction"
            step0 = episode["steps"][0]
            assert ep.instruction == step0.get(key, step0["observation"].get(key))


def test_droid_spec_matches_droid_features():
    """The droid spec's keys are DROID step features and give 8 state and 8 action dims."""
    steps = droid_features()["steps"].feature
    flat = {}

    def walk(feature, prefix):
        for k, v in feature.items():
            walk(v, f"{prefix}{k}/") if isinstance(v, f.FeaturesDict) else flat.setdefault(f"{prefix}{k}", v)

    walk(steps, "")
    spec = get_spec("droid")
    assert set(spec.camera_keys) | {*spec.lowdim_keys(), spec.instruction_key} <= set(flat)
    assert spec.canonical_dims({k: int(np.prod(flat[k].shape)) for k in spec.lowdim_keys()}, "droid") == (8, 8)


def test_image_text_dataset_converts_and_reads(sources, converted):
    """A coco_captions-layout TFRecord dataset converts with the same tool; ImageTextSource reads
    it; the ClassLabel's names (a label file TFDS writes beside features.json) come along."""
    src, data = sources["coco_captions"]
    out = converted["coco_captions"][0]
    assert {p for p in os.listdir(src) if ".tfrecord-" not in p} <= set(os.listdir(out))
    assert tfds.builder_from_directory(out).info.features["label"].names == ["cup", "spoon", "towel"]
    assert "episode_lengths" not in (tfds.builder_from_directory(out).info.metadata or {})
    source = ImageTextSource(out, "train", fields=FieldMap(image_key="image", target_key="captions/text"))
    assert len(source) == len(data["read"]["train"])
    for i, want in enumerate(data["read"]["train"]):
        ex = source[i]
        assert ex["target"] == want["captions"]["text"][0].decode() and ex["prompt"] == "caption en"
        written = data["written"]["train"][int(want["image/id"])]["image"]
        assert ex["images"]["image"].shape == (1, *written.shape)
        # the JPEG tf.data read undecoded, decoded here with PIL as the reader does, is the frame read
        np.testing.assert_array_equal(ex["images"]["image"][0], np.asarray(Image.open(io.BytesIO(want["image"]))))
        assert np.abs(ex["images"]["image"][0].astype(int) - written).mean() < 12  # JPEG's loss


def test_resume_converts_only_missing_shards(sources, tmp_path):
    """A conversion killed after one shard leaves no dataset_info.json; the rerun converts the
    other shards only; a deleted shard (or one left .partial) is redone alone."""
    src = sources["fractal20220817_data"][0]
    out = str(tmp_path / "out")

    def kill(path):
        raise KeyboardInterrupt(path)

    with pytest.raises(KeyboardInterrupt):
        convert_rlds.convert(src, out, workers=1, progress=False, on_shard=kill)
    assert not os.path.exists(os.path.join(out, "dataset_info.json"))
    done = []
    report = convert_rlds.convert(src, out, workers=1, progress=False, on_shard=done.append)
    assert (report["converted"], report["skipped"]) == (1, 1) and len(done) == 1
    first = os.path.join(out, "fractal20220817_data-train.array_record-00000-of-00002")
    assert done[0].endswith("00001-of-00002")
    os.remove(first)
    with open(first + ".partial", "wb") as fh:
        fh.write(b"half a shard")
    report = convert_rlds.convert(src, out, workers=1, progress=False, on_shard=done.append)
    assert (report["converted"], report["skipped"]) == (1, 1) and done[-1] == first
    assert not os.path.exists(first + ".partial")
    assert convert_rlds.convert(src, out, progress=False)["converted"] == 0
    assert len(RobotDataset(out, "fractal", "train")) == 3


def _copy(src: str, tmp_path) -> str:
    dst = str(tmp_path / "src")
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:len(b) - 7], r"record \d+ at byte \d+: file ends inside .*truncated"),
    (lambda b: b[:9] + bytes([b[9] ^ 1]) + b[10:], "record 0 at byte 0: length CRC mismatch"),
    (lambda b: b[:-10] + bytes([b[-10] ^ 1]) + b[-9:], r"record \d+ at byte \d+: data CRC mismatch"),
])
def test_corrupt_shard_is_named(sources, tmp_path, damage, message):
    """A damaged TFRecord shard fails the conversion with the shard's path, the record and why."""
    src = _copy(sources["coco_captions"][0], tmp_path)
    shard = os.path.join(src, "coco_captions-train.tfrecord-00001-of-00002")
    with open(shard, "rb") as fh:
        data = fh.read()
    with open(shard, "wb") as fh:
        fh.write(damage(data))
    with pytest.raises(ConversionError, match=f"{shard}: {message}"):
        convert_rlds.convert(src, str(tmp_path / "out"), workers=1, progress=False)


def test_count_mismatch_and_missing_shard_are_named(sources, tmp_path):
    """dataset_info.json's shard lengths are checked per shard; a missing shard is named first."""
    src = _copy(sources["coco_captions"][0], tmp_path)
    with open(os.path.join(src, "dataset_info.json")) as fh:
        info = json.load(fh)
    info["splits"][0]["shardLengths"] = [str(int(n) + 1) for n in info["splits"][0]["shardLengths"]]
    with open(os.path.join(src, "dataset_info.json"), "w") as fh:
        json.dump(info, fh)
    with pytest.raises(ConversionError, match=r"shard .*-00000-of-00002 holds \d+ records, but dataset_info"):
        convert_rlds.convert(src, str(tmp_path / "out"), workers=1, progress=False)
    os.remove(os.path.join(src, "coco_captions-train.tfrecord-00001-of-00002"))
    with pytest.raises(ConversionError, match="missing .*00001-of-00002"):
        convert_rlds.convert(src, str(tmp_path / "out2"), workers=1, progress=False)


def test_tfrecord_framing_round_trips(tmp_path):
    """write_tfrecord / read_tfrecord agree (empty, short and long records)."""
    path = str(tmp_path / "x.tfrecord")
    records = [b"", b"a" * 3, bytes(range(256)) * 40]
    convert_rlds.write_tfrecord(path, records)
    assert list(convert_rlds.read_tfrecord(path)) == records


def test_cli_converts_end_to_end(sources, tmp_path):
    """python -m tools.convert rlds prints the summary line; the output opens as ArrayRecord."""
    out = str(tmp_path / "bridge")
    run = subprocess.run([sys.executable, "-m", "tools.convert", "rlds", "--src", os.path.dirname(sources["bridge"][0]),
                          "--out", out, "--workers", "1"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "converted bridge: 6 records in 4 shards" in run.stdout and "MB/s" in run.stdout
    assert "records" in run.stderr  # the progress bar
    assert sorted(tfds.builder_from_directory(out).info.metadata["episode_lengths"]["val"]) == [2, 3]
    bad = subprocess.run([sys.executable, "-m", "tools.convert", "rlds", "--src", str(tmp_path / "nope"),
                          "--out", out], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode != 0 and "does not exist" in bad.stderr
