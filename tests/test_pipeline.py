"""The mixture pipeline: contract shapes, determinism, exact restore, weights, bad data, errors."""
import dataclasses
import functools
import os
import shutil

import grain
import numpy as np
import pytest
from etils import epath

from configs import demo, specs
from data import fast, fast_targets, normalize, pipeline, prompt, rlds, sources, stats, windows
from data.tokenizer import Tokenizer, train_sentencepiece
from data.transform import DatasetSpec
from tests.data_fixtures import TINY_FAST_VOCAB, tiny_config

TEXTS = ["pick up the block", "open the drawer", "press the button", "what is on the table?",
         "a red block", "the robot arm"]
SUBTASKS = ("reach the block", "lift the block")


def _config(**data):
    c = demo.get_config()
    c.batch_size = 8
    c.knobs.context_frames = 2
    c.knobs.context_stride_s = 0.05  # 4 native steps at 80 Hz
    c.model.image_size = 16
    c.model.cameras = ("corner2", "wrist")
    c.model.state_dim = 6
    c.model.action_dim = 5
    c.data.update(data)
    return c


def _robot_data(seed: int, bad: tuple[int, int] | None = None) -> windows.ArrayDataset:
    """Four 80 Hz episodes, one camera at 12x12 (resized to 16), 4-d state and actions.
    bad=(episode, step): that step's record is corrupt."""
    rng = np.random.default_rng(seed)
    eps = []
    for e, n in enumerate((20, 9, 30, 15)):
        frames = rng.integers(0, 255, (n, 12, 12, 3), np.uint8)
        ep = windows.ArrayEpisode({"corner2": frames}, rng.normal(size=(n, 4)).astype(np.float32),
                                  rng.normal(size=(n, 4)).astype(np.float32), 80.0, TEXTS[e],
                                  tuple(SUBTASKS[j >= n // 2] for j in range(n)))
        eps.append(_Corrupt(ep, "memory_robot", e, bad[1]) if bad and bad[0] == e else ep)
    return windows.ArrayDataset(eps, spec=DatasetSpec("memory_robot", {}, (), gripper_dims=(3,)))


class _Corrupt:
    """An episode whose record at one step cannot be decoded (what rlds.RobotEpisode raises)."""

    def __init__(self, ep, dataset, index, bad_step):
        self._ep, self._where = ep, (dataset, index, bad_step)
        self.length, self.control_hz, self.instruction = ep.length, ep.control_hz, ep.instruction

    def steps(self, indices):
        if self._where[2] in list(indices):
            raise rlds.CorruptRecordError(*self._where, ValueError("truncated PNG"))
        return self._ep.steps(indices)


def _text_data(n: int, size: int = 20) -> list[dict]:
    rng = np.random.default_rng(n)
    return [dict(images={"cam": rng.integers(0, 255, (1, size, size + 4, 3), np.uint8)},
                 prompt=TEXTS[i % 6], target=TEXTS[(i + 1) % 6]) for i in range(n)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    return Tokenizer(train_sentencepiece(TEXTS * 20, path, 300))


def _robot_stats():
    return stats.dataset_stats(functools.partial(_robot_data, 0), progress=False)


def _sources(config, tokenizer, bad=None, fast_actions=None):
    layout = specs.build(config).data.layout
    opener = functools.partial(_robot_data, 0, bad)
    return {
        "robot": sources.RobotSource("robot", opener, layout,
                                     specs.build(config).data.window, _robot_stats(),
                                     config.data.normalization, tokenizer, fast_actions),
        "vl": sources.TextSource("vl", functools.partial(_text_data, 40), layout, tokenizer),
    }


FAST_VOCAB = 512


def _pi05_config(**data):
    c = _config(**data)
    c.model.mode = "pi05"
    c.knobs.max_text_tokens = 128  # prompt + state bins + subtask + FAST tokens of noisy actions
    return c


@pytest.fixture(scope="module")
def pi05_fast(tokenizer):
    """(text tokenizer with a FAST id range, FastActions fit on the robot data's windows)."""
    spec = specs.build(_pi05_config()).data.window
    norm = normalize.normalizers(_robot_stats(), "quantile")["actions"]
    chunks = fast_targets.sample_chunks(_robot_data(0), spec, (3,), norm, 1000)
    actions = fast_targets.FastActions(fast.fit(chunks, FAST_VOCAB), spec.horizon, 4,
                                       spec.control_hz, "quantile")
    return Tokenizer(tokenizer.path, n_fast_tokens=actions.vocab_size), actions


def _pipeline(config, tokenizer, weights=None, bad=None, fast_actions=None, **kw):
    srcs = _sources(config, tokenizer, bad, fast_actions)
    kw = dict(seed=config.seed, batch_size=config.batch_size, workers=config.data.workers,
              strict=config.data.strict, errors=pipeline.bad_record_errors(),
              tokenizer=tokenizer, fast={"robot": fast_actions} if fast_actions else None, **kw)
    return pipeline.mix(srcs, weights or {"robot": 0.7, "vl": 0.3},
                        specs.build(config).data.layout, **kw)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            if k == "images":
                for cam in x[k]:
                    np.testing.assert_array_equal(x[k][cam], y[k][cam])
            else:
                np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batches_obey_contract(tokenizer):
    config = _config()
    it = _pipeline(config, tokenizer)
    spec = it.element_spec()
    for batch in _take(it, 3):
        assert set(batch) == {k for k in spec if "/" not in k} | {"images"}
        for key, (shape, dtype) in spec.items():
            arr = batch["images"][key.split("/")[1]] if key.startswith("images/") else batch[key]
            assert arr.shape == shape and arr.dtype == dtype, key
        assert spec["images/corner2"][0] == (8, 2, 16, 16, 3)
        assert spec["actions"][0] == (8, 10, 5)  # H = 0.5 s * 20 Hz
        robot, text = batch["source"] == 0, batch["source"] == 1
        # Robot rows: the wrist camera is missing, state/action padding masked.
        assert not batch["image_mask"][:, 1].any() and not batch["frame_mask"][:, 1].any()
        assert batch["image_mask"][robot, 0].all()
        assert not batch["action_mask"][..., 4:].any() and not batch["actions"][..., 4:].any()
        assert not batch["state"][:, 4:].any()
        assert batch["action_mask"][robot, 0, :4].all()
        assert not batch["target_mask"][robot].any()
        # Text rows: one frame in the first camera, no actions, a target with a loss.
        assert batch["image_mask"][text, 0].all()
        np.testing.assert_array_equal(batch["frame_mask"][text, 0], [[False, True]] * text.sum())
        assert not batch["action_mask"][text].any() and not batch["state"][text].any()
        assert batch["target_mask"][text].any(1).all()
        assert (batch["target_mask"] <= batch["token_mask"]).all()
    assert it.metrics() == {"data/skipped/robot": 0, "data/skipped/vl": 0}


def test_same_seed_same_batches(tokenizer):
    config = _config()
    a, b = _take(_pipeline(config, tokenizer), 4), _take(_pipeline(config, tokenizer), 4)
    _assert_same(a, b)
    config.seed = 1
    c = _take(_pipeline(config, tokenizer), 4)
    assert any((x["tokens"] != y["tokens"]).any() for x, y in zip(a, c))


@pytest.mark.parametrize("workers,mode", [(0, "pi0"), (2, "pi0"), (1, "pi05")])
def test_restored_iterator_continues_identically(tokenizer, pi05_fast, workers, mode, tmp_path):
    config = _config(workers=workers)
    kw = {}
    if mode == "pi05":  # subtask + FAST targets, FAST tokenizer shipped to the worker process
        config, (tokenizer, kw["fast_actions"]) = _pi05_config(workers=workers), pi05_fast
    it = _pipeline(config, tokenizer, **kw)
    _take(it, 3)
    # Through Grain's Orbax handler, as the trainer's checkpoint does.
    grain.checkpoint.CheckpointHandler().save(epath.Path(tmp_path), item=it)
    expected = _take(it, 4)
    it.close()
    restored = _pipeline(config, tokenizer, **kw)
    grain.checkpoint.CheckpointHandler().restore(epath.Path(tmp_path), item=restored)
    _assert_same(_take(restored, 4), expected)
    restored.close()


def test_restore_into_changed_weights(tokenizer):
    config = _config()
    config.batch_size = 50
    it = _pipeline(config, tokenizer, weights={"robot": 0.5, "vl": 0.5})
    _take(it, 2)
    state = it.get_state()
    reweighted = _pipeline(config, tokenizer, weights={"robot": 0.9, "vl": 0.1})
    reweighted.set_state(state)
    src = np.concatenate([b["source"] for b in _take(reweighted, 20)])
    assert abs((src == 0).mean() - 0.9) < 0.03


def test_mixture_proportions(tokenizer):
    config = _config()
    config.batch_size = 200
    # 8² frames: smaller than any model's patch grid, only the mixture is under test.
    layout = dataclasses.replace(specs.build(config).data.layout, image_size=8)
    weights = {"a": 0.6, "b": 0.3, "c": 0.1}
    # >= 1000 examples each: Grain's index shuffle is slow on tiny index ranges.
    srcs = {n: sources.TextSource(n, functools.partial(_text_data, 1000 + i, 8), layout, tokenizer)
            for i, n in enumerate(weights)}
    it = pipeline.mix(srcs, weights, layout, seed=0, batch_size=200)
    src = np.concatenate([b["source"] for b in _take(it, 50)])
    assert len(src) == 10_000
    for k, w in enumerate(weights.values()):
        assert abs((src == k).mean() - w) < 0.02


def test_corrupt_records_skipped_and_counted(tokenizer):
    config = _config()
    config.batch_size = 16
    bad = (1, 4)  # episode 1 (9 steps): every window that reads step 4 fails
    it = _pipeline(config, tokenizer, bad=bad)
    batches = _take(it, 40)
    skipped = it.metrics()["data/skipped/robot"]
    assert skipped > 0 and it.metrics()["data/skipped/vl"] == 0
    assert all(b["state"].shape == (16, 6) for b in batches)
    # The count is part of the iterator state.
    again = _pipeline(config, tokenizer, bad=bad)
    again.set_state(it.get_state())
    assert again.metrics() == it.metrics()

    config.data.strict = True
    strict = _pipeline(config, tokenizer, bad=bad)
    with pytest.raises(rlds.CorruptRecordError, match="'memory_robot', episode 1, step 4"):
        _take(strict, 40)


def test_context_stride_finer_than_native_period_fails_early(tokenizer):
    config = _config()
    config.knobs.context_stride_s = 0.005
    with pytest.raises(ValueError, match="native period"):
        _sources(config, tokenizer)


def test_bad_path_and_kind_fail_at_construction(tokenizer, tmp_path):
    root = str(tmp_path)
    os.link(tokenizer.path, os.path.join(root, "tokenizer.model"))
    config = _config(root=root)
    with pytest.raises(ValueError, match="metaworld.*does not exist"):
        pipeline.make_pipeline(specs.build(config).data, process_index=0, process_count=1)
    config.data.sources = {"x": dict(kind="audio", path=".", weight=1.0)}
    with pytest.raises(ValueError, match="unknown kind 'audio'"):
        pipeline.make_pipeline(specs.build(config).data, process_index=0, process_count=1)
    os.makedirs(os.path.join(root, "robot"))
    config.data.sources = {"r": dict(kind="robot", path="robot", spec="nope", weight=1.0)}
    with pytest.raises(ValueError, match="no dataset spec named 'nope'"):
        pipeline.make_pipeline(specs.build(config).data, process_index=0, process_count=1)
    config.data.sources = {"r": dict(kind="robot", path="robot", spec="metaworld", weight=1.0)}
    with pytest.raises(ValueError, match="not a TFDS dataset directory"):
        pipeline.make_pipeline(specs.build(config).data, process_index=0, process_count=1)
    with pytest.raises(FileNotFoundError, match="SentencePiece"):
        pipeline.make_pipeline(specs.build(_config(root=str(tmp_path / "none"))).data,
                               process_index=0, process_count=1)


def _generated_pi05_config(root):
    config = tiny_config()  # FAST targets on, fit by the fixture's postprocess
    config.data.root = root
    config.model.mode = "pi05"
    config.knobs.max_text_tokens = 96
    return config


def test_generated_data_end_to_end(generated_root):
    config = _generated_pi05_config(generated_root)
    config.batch_size = 8
    it = pipeline.make_pipeline(specs.build(config).data, process_index=1, process_count=2)
    spec = it.element_spec()
    global_spec = pipeline.element_spec(specs.build(config).data)
    assert it.element_spec(global_batch=True) == global_spec
    assert global_spec["tokens"][0] == (8, 96) and spec["tokens"][0] == (4, 96)
    tok = it.tokenizer
    assert tok.n_fast_tokens == TINY_FAST_VOCAB and it.fast_token_start == tok.fast_offset
    for batch in _take(it, 3):
        for key, (shape, dtype) in spec.items():
            arr = batch["images"][key.split("/")[1]] if key.startswith("images/") else batch[key]
            assert arr.shape == shape and arr.dtype == dtype, key
        robot = batch["source"] == sorted(config.data.sources).index("metaworld")
        # π0.5: the robot prompt carries one state token per native state dim (4).
        state_ids = {tok.state_id(b) for b in range(256)}
        n_state = np.isin(batch["tokens"], list(state_ids)).sum(1)
        assert (n_state[robot] == 4).all() and (n_state[~robot] == 0).all()
        assert batch["action_mask"][robot, 0, :4].all()
        # Robot targets: subtask text and FAST ids (only there, inside the FAST range).
        is_fast = batch["tokens"] >= it.fast_token_start
        assert (is_fast.any(1) == robot).all() and (batch["tokens"] < tok.vocab_size).all()
        assert not (is_fast & ~batch["target_mask"]).any()
        for row in np.flatnonzero(robot):
            text = prompt.decode_target(tok, batch["tokens"][row], batch["target_mask"][row])
            assert prompt.parse_subtask(text) in ("move the gripper to the goal",
                                                  "reach the button",
                                                  "press the button from the top", "done")
    assert set(it.stats) == set(it.normalizers) == set(it.fast) == {"metaworld"}
    heldout = pipeline.make_pipeline(specs.build(config).data, "eval", process_index=0,
                                     process_count=1)
    assert (next(heldout)["source"] == 0).all()  # only the robot dataset has a heldout split
    config.knobs.chunk_s = 1.0  # no FAST fit at horizon 20: an error before any batch
    with pytest.raises(ValueError, match="no FAST tokenizer for horizon 20"):
        pipeline.make_pipeline(specs.build(config).data, process_index=0, process_count=1)


def test_fast_round_trip_of_generated_windows(generated_root):
    """A real window's chunk -> π0.5 tokens -> parsed back -> decoded -> unnormalized."""
    data = specs.build(_generated_pi05_config(generated_root)).data
    src = data.source("metaworld")
    actions = fast_targets.load_for_source(src, data)
    tok = Tokenizer(data.tokenizer_path(), n_fast_tokens=actions.vocab_size)
    source = sources.make_source(src, data, "train", tok, actions)
    norm = source.normalizers["actions"]
    ds = rlds.RobotDataset(data.dataset_dir(src))
    spec = data.window
    e = 2  # a button press: reach, press, done
    length = ds.episode(e).length
    start = int(ds.episode_lengths[:e].sum())
    for step in (10, length - 5):  # inside the episode, and a chunk running past its end
        ex = source[start + step]
        window = windows.make_window(ds.episode(e), step, spec, ds.spec.hold_dims)
        native = windows.hold_past_end(window["actions"], window["action_valid"])
        assert window["action_valid"].all() == (step == 10)
        subtask = prompt.parse_subtask(prompt.decode_target(tok, ex["tokens"], ex["target_mask"]))
        assert subtask == window["subtask"] == ds.episode(e).steps([step])["subtask"][0]
        # What a model generates after the prompt: the target positions.
        chunk = actions.decode_generated(tok, ex["tokens"][ex["target_mask"]])
        assert chunk.shape == (spec.horizon, 4)
        decoded = norm.unnormalize(chunk)
        # Exactly the FAST round trip of the normalized chunk, ...
        direct = norm.unnormalize(actions.decode(actions.encode(norm.normalize(native))))
        np.testing.assert_allclose(decoded, direct, atol=1e-6)
        # ... within the rounding of the DCT coefficients of the native chunk.
        bound = 10 ** 0.5 * 0.5 / actions.tokenizer.scale * norm.scale + 1e-5
        assert (np.abs(decoded - native) <= bound).all()


def test_pi05_robot_targets_are_subtask_fast_tokens_and_eos(pi05_fast):
    tok, actions = pi05_fast
    it = _pipeline(_pi05_config(), tok, fast_actions=actions)
    assert it.fast_token_start == tok.fast_offset and it.fast == {"robot": actions}
    enc = tok.encode
    # Rounding the DCT coefficients to 1 / scale moves a value by at most sqrt(H) * 0.5 / scale.
    bound = 10 ** 0.5 * 0.5 / actions.tokenizer.scale + 1e-5
    for batch in _take(it, 2):
        for row in np.flatnonzero(batch["source"] == 0):
            tokens, target = batch["tokens"][row], batch["target_mask"][row]
            fast_pos = tokens >= tok.fast_offset
            assert fast_pos.any() and not (fast_pos & ~target).any()
            assert (tokens[fast_pos] < tok.vocab_size).all()
            ids = prompt.parse_fast_from_tokens(tok, tokens)
            subtask = prompt.parse_subtask(prompt.decode_target(tok, tokens, target))
            assert subtask in SUBTASKS
            # The targets, right after the prompt's ";\n": exactly subtask, FAST tokens, EOS.
            expected = (enc(f"Subtask: {subtask}\n") + enc("Action: ") +
                        [tok.fast_id(k) for k in ids] + enc("|") + [tok.eos_id])
            prefix = tokens[batch["token_mask"][row] & ~target].tolist()
            assert prefix[-len(enc(";\n")):] == enc(";\n")
            np.testing.assert_array_equal(np.flatnonzero(target),
                                          np.arange(len(prefix), len(prefix) + len(expected)))
            assert tokens[target].tolist() == expected
            # ... and the FAST tokens are this row's (normalized) action chunk.
            valid = batch["action_mask"][row, :, 0]
            error = actions.decode(ids)[valid] - batch["actions"][row, valid, :4]
            assert np.abs(error).max() <= bound
        text = batch["source"] == 1
        assert not (batch["tokens"][text] >= tok.fast_offset).any()


def test_pi05_without_fast_targets_has_the_subtask_only(tokenizer):
    batch = next(_pipeline(_pi05_config(), tokenizer))
    for row in np.flatnonzero(batch["source"] == 0):
        tokens, target = batch["tokens"][row], batch["target_mask"][row]
        subtask = prompt.parse_subtask(prompt.decode_target(tokenizer, tokens, target))
        assert subtask in SUBTASKS
        assert tokens[target].tolist() == tokenizer.encode(f"Subtask: {subtask}\n") + [
            tokenizer.eos_id]


def _concat(batches: list[dict]) -> dict:
    """Batches -> one, row-wise (images a nested dict)."""
    return {k: _concat([b[k] for b in batches]) if isinstance(batches[0][k], dict)
            else np.concatenate([b[k] for b in batches]) for k in batches[0]}


def _rows(batch: dict, rows: slice) -> dict:
    return {k: _rows(v, rows) if isinstance(v, dict) else v[rows] for k, v in batch.items()}


def test_processes_read_their_rows_of_one_global_batch_sequence(tokenizer):
    """Process p of 2 gets rows [4p, 4p + 4) of the 1-process batch of 8, also with worker
    processes; a state saved under 2 processes resumes the sequence in 1."""
    config = _config()
    expected = _take(_pipeline(config, tokenizer), 4)
    halves = [_pipeline(config, tokenizer, process_index=p, process_count=2) for p in (0, 1)]
    _assert_same([_concat(rows) for rows in zip(*(_take(it, 2) for it in halves))], expected[:2])
    one = _pipeline(config, tokenizer)
    one.set_state(halves[1].get_state())
    _assert_same(_take(one, 2), expected[2:])
    config.data.workers = 2
    workers = _pipeline(config, tokenizer, process_index=1, process_count=2)
    _assert_same(_take(workers, 4), [_rows(b, slice(4, 8)) for b in expected])
    workers.close()


def _corrupted_copy(generated_root, tmp_path, whole_file=False):
    """A copy of the generated data whose robot train shard has 4 KiB of random bytes in the
    middle (one or two episodes unreadable), or random bytes throughout."""
    root = tmp_path / "data"
    shutil.copytree(generated_root, root)
    (shard,) = (root / "metaworld_rlds").glob("*-train.array_record-*")
    size = shard.stat().st_size
    rng = np.random.default_rng(0)
    with open(shard, "r+b") as f:
        f.seek(0 if whole_file else size // 2)
        f.write(rng.integers(0, 256, size if whole_file else 4096, np.uint8).tobytes())
    config = tiny_config()
    config.data.root = str(root)
    config.data.sources = {"metaworld": config.data.sources.metaworld.to_dict()}
    config.batch_size = 8
    return config, shard


def test_corrupt_shard_region_skips_its_episodes_and_keeps_going(generated_root, tmp_path):
    config, shard = _corrupted_copy(generated_root, tmp_path)
    it = pipeline.make_pipeline(specs.build(config).data, process_index=0, process_count=1)
    batches = _take(it, 40)  # ~4 passes over the 4 tiny episodes' windows
    assert len(batches) == 40 and it.metrics()["data/skipped/metaworld"] > 0

    config.data.strict = True
    strict = pipeline.make_pipeline(specs.build(config).data, process_index=0, process_count=1)
    with pytest.raises(rlds.CorruptRecordError) as e:
        _take(strict, 40)
    message = str(e.value)
    # Names the dataset, the episode, the file and the underlying reader error.
    assert "'metaworld_rlds', episode " in message and str(shard) in message
    assert e.value.cause is not None and str(e.value.cause) in message


def test_wholly_unreadable_source_fails_at_startup(generated_root, tmp_path):
    config, _ = _corrupted_copy(generated_root, tmp_path, whole_file=True)
    with pytest.raises(ValueError, match="source 'metaworld': no readable data"):
        pipeline.make_pipeline(specs.build(config).data, process_index=0, process_count=1)


def test_openpi_prompt_format_in_robot_and_text_examples(tokenizer):
    """data.prompt_format "openpi": robot examples carry openpi's π0.5 prompt (state digitized
    as openpi does, as text), text examples openpi's π0 layout; built with SentencePiece here."""
    import sentencepiece as spm
    tok, sp = Tokenizer(tokenizer.path, id_layout="openpi"), spm.SentencePieceProcessor(
        model_file=tokenizer.path)
    config = _pi05_config()
    layout, window = specs.build(config).data.layout, specs.build(config).data.window
    robot = sources.RobotSource("robot", functools.partial(_robot_data, 0), layout, window,
                                _robot_stats(), "quantile", tok, None, "openpi")
    ex = robot[5]  # episode 0 (20 steps), step 5
    bins = np.digitize(ex["state"][:4], np.linspace(-1, 1, 257)[:-1]) - 1
    prefix = sp.encode(f"Task: {TEXTS[0]}, State: {' '.join(map(str, bins))};\nAction: ",
                       add_bos=True)
    target = sp.encode(f"Subtask: {SUBTASKS[0]}\n") + [sp.eos_id()]
    assert ex["tokens"][ex["token_mask"]].tolist() == prefix + target
    assert np.flatnonzero(ex["target_mask"]).tolist() == list(range(len(prefix), len(prefix) + len(target)))
    text = sources.TextSource("vl", functools.partial(_text_data, 2), layout, tok, "openpi")[0]
    expected = (sp.encode(TEXTS[0], add_bos=True) + sp.encode("\n") + sp.encode(TEXTS[1])
                + [sp.eos_id()])
    assert text["tokens"][text["token_mask"]].tolist() == expected


def test_openpi_prompt_format_reaches_the_pipelines_tokenizer(generated_root):
    config = _generated_pi05_config(generated_root)
    config.data.fast_targets = False  # FAST ids would sit on this small model's text pieces
    config.data.prompt_format = "openpi"
    config.batch_size = 8
    it = pipeline.make_pipeline(specs.build(config).data, process_index=0, process_count=1)
    tok = it.tokenizer
    assert tok.id_layout == "openpi" and tok.vocab_size == tok.n_sp
    batch = next(it)
    row = int(np.flatnonzero(batch["source"] == 0)[0])  # metaworld
    prefix = batch["tokens"][row][batch["token_mask"][row] & ~batch["target_mask"][row]]
    text = tok.decode(prefix)
    assert text.startswith("Task: ") and text.endswith(";\nAction: ") and "<state" not in text


def test_windows_are_the_same_whether_the_episode_cache_keeps_images_or_not(tokenizer, monkeypatch):
    """A dataset too big for the image cache caches state and actions from dataset.lowdim (no frame
    decoded) after its first episode; every window is unchanged."""
    config = _config()
    cached = _sources(config, tokenizer)["robot"]
    expected = [cached[i] for i in range(len(cached))]
    monkeypatch.setattr(sources, "EPISODE_CACHE_BYTES", 0)
    lean = _sources(config, tokenizer)["robot"]
    full_reads = []
    real = windows.ArrayEpisode.steps
    monkeypatch.setattr(windows.ArrayEpisode, "steps",
                        lambda self, idx: (full_reads.append(len(idx)) if len(idx) == self.length else None)
                        or real(self, idx))
    for i, ex in enumerate(expected):
        got = lean[i]
        for key in ("state", "actions", "action_mask", "tokens", "frame_mask"):
            np.testing.assert_array_equal(got[key], ex[key], err_msg=key)
        np.testing.assert_array_equal(got["images"]["corner2"], ex["images"]["corner2"])
    assert len(full_reads) <= 1  # the first episode decides; the others read only their windows' frames
