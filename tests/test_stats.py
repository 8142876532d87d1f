"""Statistics match numpy on generated arrays (serial and over worker processes); normalizers;
openpi's norm_stats.json as our statistics; a source's `stats` file."""
import dataclasses
import functools
import json
import os
import pathlib

import numpy as np
import pytest

from configs import specs
from data import fast_targets, normalize, pipeline, rlds, stats, windows
from tests.data_fixtures import TINY_FAST_VOCAB, tiny_config
from tools.stats import compute_stats


def _dataset(seed: int, n: int = 12) -> windows.ArrayDataset:
    """Episodes of random lengths; heavy-tailed actions so q01/q99 differ from min/max."""
    rng = np.random.default_rng(seed)
    out = []
    for e in range(n):
        length = 0 if e == 3 else int(rng.integers(1, 60))  # one empty episode
        state = rng.normal(e, 2.0, (length, 3)).astype(np.float32)
        state[:, 2] = 7.0  # a constant dim
        acts = rng.standard_t(3, (length, 2)).astype(np.float32)
        out.append(windows.ArrayEpisode({}, state, acts, control_hz=10.0))
    return windows.ArrayDataset(out)


def _all(ds, key):
    return np.concatenate([ds.episode(e).steps(range(ds.episode(e).length))[key]
                           for e in range(len(ds))])


@pytest.mark.parametrize("workers", [0, 2])
def test_stats_match_numpy(workers):
    opener = functools.partial(_dataset, 0)
    s = stats.dataset_stats(opener, workers=workers, progress=False)
    ds = opener()
    assert s["num_episodes"] == len(ds) and s["skipped_episodes"] == 0
    for key in stats.KEYS:
        x = _all(ds, key).astype(np.float64)
        got = {k: np.asarray(v) for k, v in s[key].items()}
        assert got["count"] == len(x) == s["num_steps"]
        np.testing.assert_allclose(got["mean"], x.mean(0), rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(got["std"], x.std(0), rtol=1e-10, atol=1e-10)
        np.testing.assert_array_equal(got["min"], x.min(0))
        np.testing.assert_array_equal(got["max"], x.max(0))
        bin_width = (x.max(0) - x.min(0)) / stats.BINS
        for q in ("q01", "q99"):
            exact = np.quantile(x, float(q[1:]) / 100, axis=0)
            assert np.all(np.abs(got[q] - exact) <= bin_width + 1e-12), (key, q, got[q], exact)
    assert s["state"]["q01"][2] == s["state"]["q99"][2] == 7.0


def test_hist_quantile_across_an_empty_gap():
    # Ranks 0 and 1 sit at opposite ends of the range: the median must interpolate between them.
    x = np.array([[0.0], [100.0]])
    h = stats.histogram(x, np.array([0.0]), np.array([100.0]), bins=10)
    got = stats.hist_quantile(h, np.array([0.0]), np.array([100.0]), 0.5)
    assert abs(got[0] - 50.0) <= 10.0


def test_moments_merge_is_order_free():
    rng = np.random.default_rng(1)
    parts = [rng.normal(size=(n, 4)) * 1e3 + 1e6 for n in (1, 7, 300)]
    m = stats.Moments.of(parts[2]).merge(stats.Moments.of(parts[0])).merge(
        stats.Moments.of(parts[1]))
    x = np.concatenate(parts)
    np.testing.assert_allclose(m.mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(np.sqrt(m.m2 / m.count), x.std(0), rtol=1e-9)


def test_save_and_load_beside_dataset(tmp_path):
    s = stats.dataset_stats(functools.partial(_dataset, 2, 3), progress=False)
    path = stats.save_stats(str(tmp_path), s)
    assert path == str(tmp_path / "stats.json")
    assert stats.load_stats(str(tmp_path)) == s
    with pytest.raises(FileNotFoundError, match="tools.stats"):
        stats.load_stats(str(tmp_path / "missing"))


@pytest.mark.parametrize("mode", normalize.MODES)
def test_normalizer_inverse_and_padding(mode):
    s = stats.dataset_stats(functools.partial(_dataset, 0), progress=False)
    norm = normalize.normalizers(s, mode)
    x = _all(_dataset(0), "actions")
    y = norm["actions"].normalize(x)
    if mode == "quantile":
        np.testing.assert_allclose(norm["actions"].normalize(np.asarray(s["actions"]["q01"])), -1,
                                   atol=1e-5)
        np.testing.assert_allclose(norm["actions"].normalize(np.asarray(s["actions"]["q99"])), 1,
                                   atol=1e-5)
    else:
        np.testing.assert_allclose(y.mean(0), 0, atol=1e-5)
        np.testing.assert_allclose(y.std(0), 1, atol=1e-5)
    np.testing.assert_allclose(norm["actions"].unnormalize(y), x, rtol=1e-5, atol=1e-5)
    # Padded chunk [H, A_pad]: only the dataset's dims are transformed.
    padded = np.concatenate([x[:4], np.full((4, 3), 5.0, np.float32)], -1)
    out = norm["actions"].unnormalize(norm["actions"].normalize(padded))
    np.testing.assert_allclose(out, padded, rtol=1e-5, atol=1e-5)
    assert np.all(norm["actions"].normalize(padded)[:, 2:] == 5.0)
    # The constant state dim stays finite.
    assert np.all(np.isfinite(norm["state"].normalize(_all(_dataset(0), "state"))))


def test_unknown_normalization_is_an_error():
    with pytest.raises(ValueError, match="unknown normalization"):
        normalize.Normalizer.from_stats({"mean": [0.0], "std": [1.0]}, "minmax")


def test_compute_stats_on_generated_data(generated_root):
    data = dataclasses.replace(specs.build(tiny_config()).data, root=generated_root)
    result = compute_stats(data, workers=2, progress=False)
    path = f"{generated_root}/metaworld_rlds"
    assert stats.load_stats(path) == result["metaworld"]
    ds = rlds.RobotDataset(path, "metaworld", split="train")
    arrays = [ds.episode(e).steps(range(ds.episode(e).length)) for e in range(len(ds))]
    for key in stats.KEYS:
        x = np.concatenate([a[key] for a in arrays]).astype(np.float64)
        s = result["metaworld"][key]
        assert s["count"] == len(x)
        np.testing.assert_allclose(s["mean"], x.mean(0), rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(s["std"], x.std(0), rtol=1e-9, atol=1e-9)
        bin_width = (x.max(0) - x.min(0)) / stats.BINS
        assert np.all(np.abs(np.asarray(s["q99"]) - np.quantile(x, 0.99, 0)) <= bin_width + 1e-9)


class _Unreadable(windows.ArrayDataset):
    """Episode 2's record cannot be read (what rlds.RobotDataset raises)."""

    def episode(self, index):
        if index == 2:
            raise rlds.CorruptRecordError("memory", 2, None, OSError("bad record"))
        return super().episode(index)

    def lowdim(self, index):
        self.episode(index)
        return super().lowdim(index)


def _unreadable(seed: int) -> _Unreadable:
    return _Unreadable(_dataset(seed)._episodes)


def test_unreadable_episodes_are_skipped_and_counted():
    s = stats.dataset_stats(functools.partial(_unreadable, 0), progress=False,
                            errors=(rlds.CorruptRecordError,))
    full = _dataset(0)
    assert s["skipped_episodes"] == 1
    assert s["num_steps"] == full.episode_lengths.sum() - full.episode_lengths[2]
    with pytest.raises(rlds.CorruptRecordError, match="episode 2"):
        stats.dataset_stats(functools.partial(_unreadable, 0), progress=False)


def test_fast_fit_beside_stats_keyed_by_knobs(generated_root):
    """The fixture's postprocess fit FAST (tiny_config has data.fast_targets on)."""
    config = tiny_config()
    config.data.root = generated_root
    dataset_dir = f"{generated_root}/metaworld_rlds"
    fit = f"{dataset_dir}/fast/h10_20hz"  # demo knobs: 0.5 s at 20 Hz
    assert sorted(os.listdir(fit)) == ["bpe.model", "fast.json", "meta.json"]
    with open(f"{fit}/meta.json") as f:
        meta = json.load(f)
    assert (meta["horizon"], meta["control_hz"], meta["action_dim"]) == (10, 20.0, 4)
    assert meta["vocab_size"] == TINY_FAST_VOCAB and meta["report_on"] == "heldout"
    assert 1 <= meta["report"]["mean_tokens"] <= meta["report"]["max_tokens"] < 40
    # Rounding DCT coefficients to 1/scale: per value at most sqrt(H) * 0.5 / scale.
    assert meta["report"]["max_abs_error"] <= 10 ** 0.5 * 0.5 / meta["scale"]
    data = specs.build(config).data
    actions = fast_targets.load_for_source(data.source("metaworld"), data)
    assert (actions.horizon, actions.action_dim, actions.vocab_size) == (10, 4, TINY_FAST_VOCAB)
    # Another horizon (chunk_s) or rate finds no fit, and says which fits exist.
    config.knobs.chunk_s = 1.0
    with pytest.raises(FileNotFoundError, match=r"horizon 20 at 20 Hz.*h10_20hz"):
        data = specs.build(config).data
        fast_targets.load_for_source(data.source("metaworld"), data)
    with pytest.raises(FileNotFoundError, match="horizon 10 at 40 Hz"):
        fast_targets.load(dataset_dir, 10, 40.0, "quantile")
    with pytest.raises(ValueError, match="'quantile'-normalized"):
        fast_targets.load(dataset_dir, 10, 20.0, "meanstd")
    with pytest.raises(ValueError, match=r"fit for chunks \(10, 4\)"):
        actions.encode(np.zeros((20, 4)))


def test_fast_sample_is_bounded_and_matches_the_windows():
    ds = _dataset(1)
    spec = windows.WindowSpec(frames=1, stride_s=0.1, control_hz=5.0, horizon=4, cameras=())
    norm = normalize.Normalizer(np.zeros(2, np.float32), np.full(2, 2.0, np.float32))
    chunks = fast_targets.sample_chunks(ds, spec, (), norm, max_chunks=9, seed=3)
    assert chunks.shape == (9, 4, 2)
    # Every sampled chunk is the normalized, end-held chunk of some window of the dataset.
    every = [fast_targets.target_chunk(w["actions"], w["action_valid"], norm)
             for e in range(len(ds)) for s in range(ds.episode(e).length)
             for w in [windows.make_window(ds.episode(e), s, spec)]]
    for chunk in chunks:
        assert any(np.array_equal(chunk, c) for c in every)
    assert len(fast_targets.sample_chunks(ds, spec, (), norm, max_chunks=10_000)) == len(every)
    # Unreadable episodes are skipped, like the statistics skip them.
    readable = fast_targets.sample_chunks(_unreadable(1), spec, (), norm, 10_000,
                                          errors=(rlds.CorruptRecordError,))
    assert len(readable) == len(every) - ds.episode(2).length


# ------------------------------------------------------------------ openpi's statistics
# Written by openpi's own normalize.save (see its README); CI has shared/ beside the checkout.
OPENPI_FIXTURES = pathlib.Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "openpi"
OPENPI_NORM_STATS = OPENPI_FIXTURES / "pi05_tiny" / "assets" / "tiny_robot" / "norm_stats.json"


@pytest.mark.skipif(not OPENPI_NORM_STATS.exists(), reason="openpi fixtures absent")
def test_from_openpi_reads_openpis_norm_stats(tmp_path):
    raw = json.loads(OPENPI_NORM_STATS.read_text())["norm_stats"]
    s = stats.from_openpi(OPENPI_NORM_STATS)
    for key in stats.KEYS:
        for field in ("mean", "std", "q01", "q99"):
            assert s[key][field] == raw[key][field]
        assert s[key]["min"] is s[key]["max"] is s[key]["count"] is None  # openpi has none
    assert s["from_openpi"] == str(OPENPI_NORM_STATS) and s["num_steps"] is None
    path = stats.write(tmp_path / "ckpt" / "stats.json", s)
    assert stats.read(path) == s
    stats.check(s, "quantile", 8, 8, "openpi")
    # Our normalizers from them compute openpi's transforms.Normalize (quantile and z-score).
    x = np.random.default_rng(0).normal(size=(5, 8))
    st = {k: np.asarray(v, np.float64) for k, v in raw["state"].items()}
    np.testing.assert_allclose(normalize.normalizers(s, "quantile")["state"].normalize(x),
                               (x - st["q01"]) / (st["q99"] - st["q01"] + 1e-6) * 2.0 - 1.0,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(normalize.normalizers(s, "meanstd")["state"].normalize(x),
                               (x - st["mean"]) / (st["std"] + 1e-6), rtol=1e-5, atol=1e-5)


def test_from_openpi_without_quantiles_serves_meanstd_only(tmp_path):
    entry = {"mean": [0.0, 1.0], "std": [1.0, 2.0], "q01": None, "q99": None}
    path = tmp_path / "norm_stats.json"
    path.write_text(json.dumps({"norm_stats": {"state": entry, "actions": entry}}))
    s = stats.from_openpi(str(path))
    assert s["state"]["q01"] is None and s["actions"]["std"] == [1.0, 2.0]
    stats.check(s, "meanstd", 2, 2, "here")
    with pytest.raises(ValueError, match=r"here: state has no \['q01', 'q99'\]"):
        stats.check(s, "quantile", 2, 2, "here")
    with pytest.raises(ValueError, match=r"here: statistics have dims \{'state': 2, 'actions': 2\}, "
                                         r"the dataset has \{'state': 3, 'actions': 2\}"):
        stats.check(s, "meanstd", 3, 2, "here")
    path.write_text(json.dumps({"state": entry}))
    with pytest.raises(ValueError, match="norm_stats.json: not an openpi norm_stats.json"):
        stats.from_openpi(path)


def test_source_stats_file_is_resolved_like_other_paths():
    data = specs.build(tiny_config()).data
    data = dataclasses.replace(data, root="/data")
    src = data.source("metaworld")
    assert data.stats_file(src) == "/data/metaworld_rlds/stats.json"
    for given, resolved in (("ckpt/stats.json", "/data/ckpt/stats.json"),
                            ("/abs/stats.json", "/abs/stats.json"),
                            ("gs://b/stats.json", "gs://b/stats.json")):
        assert data.stats_file(dataclasses.replace(src, stats=given)) == resolved


def _stats_source_config(root: str, stats_file: str):
    config = tiny_config()
    config.data.root = root
    entry = dict(config.data.sources.metaworld.to_dict(), stats=stats_file)
    config.data.sources = {"metaworld": entry}
    config.batch_size = 8
    return config


def test_source_stats_replace_the_datasets_and_must_match_its_dims(generated_root, tmp_path):
    own = stats.load_stats(f"{generated_root}/metaworld_rlds")
    theirs = json.loads(json.dumps(own))
    theirs["actions"]["q01"] = [v - 1.0 for v in own["actions"]["q01"]]
    given = stats.write(tmp_path / "checkpoint_stats.json", theirs)
    it = pipeline.make_pipeline(specs.build(_stats_source_config(generated_root, given)).data,
                                process_index=0, process_count=1)
    assert it.stats["metaworld"] == theirs  # what checkpoints and bundles carry
    np.testing.assert_allclose(it.normalizers["metaworld"]["actions"].normalize(
        np.asarray(theirs["actions"]["q01"])), -1.0, atol=1e-5)
    # A file of other dims fails at startup, naming the source, the file and both dims.
    for key in stats.KEYS:
        theirs[key] = {k: v if v is None else v[:3] for k, v in own[key].items() if k != "count"}
    wrong = stats.write(tmp_path / "wrong_dims.json", theirs)
    with pytest.raises(ValueError, match=(
            r"sources\.metaworld .*source 'metaworld' \(statistics .*wrong_dims\.json\): "
            r"statistics have dims \{'state': 3, 'actions': 3\}, the dataset has "
            r"\{'state': 4, 'actions': 4\}")):
        pipeline.make_pipeline(specs.build(_stats_source_config(generated_root, wrong)).data,
                               process_index=0, process_count=1)
