"""tools.faults' pure pieces: shard corruption, metrics and state comparison, log parsing."""
import os

import numpy as np

from tools import faults


def test_corrupt_middle_overwrites_4k_in_the_middle(tmp_path):
    path = tmp_path / "x-train.array_record-00000-of-00001"
    original = bytes(range(256)) * 100  # 25600 bytes
    path.write_bytes(original)
    offset = faults.corrupt_middle(str(path), np.random.default_rng(0))
    data = path.read_bytes()
    assert len(data) == len(original)
    assert offset == len(original) // 2 - 2048
    assert data[:offset] == original[:offset]
    assert data[offset + 4096:] == original[offset + 4096:]
    assert data[offset:offset + 4096] != original[offset:offset + 4096]
    assert faults.find_shard(str(tmp_path), "train") == str(path)


def test_compare_metrics_ignores_timing_and_names_differences():
    ref = [{"step": 5, "loss": 1.0, "step_time_s": 0.1, "mfu": 0.2},
           {"step": 10, "loss": 0.5, "data_wait_s": 0.0},
           {"step": 10, "eval/action_mae/x": 0.3}]
    same = [{"step": 5, "loss": 1.0, "step_time_s": 9.0, "mfu": 0.7},
            {"step": 10, "loss": 0.5, "data_wait_s": 1.0},
            {"step": 10, "eval/action_mae/x": 0.3}]
    assert faults.compare_metrics(ref, same) == []
    nan = [{"step": 5, "loss": float("nan")}]
    assert faults.compare_metrics(nan, [dict(r) for r in nan]) == []
    got = [{"step": 5, "loss": 1.0 + 1e-12}, {"step": 7, "loss": 2.0},
           {"step": 10, "loss": 0.5}, {"step": 10, "eval/action_mae/x": 0.3}]
    problems = faults.compare_metrics(ref, got)
    assert any("extra rows at steps [7]" in p for p in problems)
    assert any("step 5 loss" in p for p in problems)
    assert any("rows missing at steps [10]" in p
               for p in faults.compare_metrics(ref, got[:2]))
    # killed during the evaluation after a save: the evaluation row of that step never comes back
    problems = faults.compare_metrics(ref, ref[:2])
    assert problems == ["1 row(s) differ (step 10: 1 rows, reference 2 (missing the eval/* row))"]


def test_compare_states_is_bitwise_and_per_entry():
    ref = {"params": {"w": np.ones(3, np.float32)}, "opt_state": [{"mu": np.zeros(2)}],
           "step": np.int32(4)}
    assert faults.compare_states(ref, {"params": {"w": np.ones(3, np.float32)},
                                       "opt_state": [{"mu": np.zeros(2)}], "step": np.int32(4)}) == []
    # -0.0 == 0.0 numerically, not bitwise
    other = {"params": {"w": np.array([1, 1, 1 + 2**-20], np.float32)},
             "opt_state": [{"mu": -np.zeros(2)}], "step": np.int32(4)}
    problems = faults.compare_states(ref, other)
    assert problems[0].startswith("params: 1/1 arrays differ (first params/w")
    assert problems[1].startswith("opt_state: 1/1")
    assert "only here" in faults.compare_states(ref, {**other, "ema": {"w": np.ones(3)}})[0]


def test_nonfinite_covers_params_and_ema_only():
    state = {"params": {"a": np.array([1.0, np.inf])}, "ema": {"a": np.array([np.nan, np.nan])},
             "opt_state": {"nu": np.array([np.nan])}, "step": np.int32(1)}
    assert faults.nonfinite(state) == ["params/a: 1", "ema/a: 2"]
    assert faults.nonfinite({"params": {"a": np.zeros(2), "i": np.arange(3)}}) == []


def test_log_parsing_and_checkpoint_listing(tmp_path):
    err = ("W1201 noise\rtrain:  50%|#| 20/40 [00:50<00:08,  2.24it/s]\rtrain:  52%|#| 21/40 [00:51<01:30]\n"
           "Traceback (most recent call last):\nFloatingPointError: step 2: loss is nan; stopping\n"
           "train:  52%|#| 2/40 [00:51<01:30]\n")
    assert faults.tqdm_steps(err) == [20, 21, 2]
    assert faults.last_error(err) == "FloatingPointError: step 2: loss is nan; stopping"
    for name in ("5", "10", "15.orbax-checkpoint-tmp-123", "x"):
        os.makedirs(tmp_path / name)
    assert faults.checkpoint_steps(str(tmp_path)) == [5, 10]
    assert faults.tmp_dirs(str(tmp_path)) == ["15.orbax-checkpoint-tmp-123"]
    assert faults.checkpoint_steps(str(tmp_path / "absent")) == []
    assert faults.override_args({"a.b": "x/y", "lr": 1e40, "t": ("p", "q"), "s": True}) == [
        "--config.a.b=x/y", "--config.lr=1e+40", "--config.t=('p', 'q')", "--config.s=True"]


def test_mirror_copies_only_the_shard_it_is_asked_to(tmp_path):
    src, dst = tmp_path / "data", tmp_path / "copy"
    (src / "robot").mkdir(parents=True)
    (src / "vl").mkdir()
    (src / "robot" / "r-train.array_record-00000-of-00001").write_bytes(b"x" * 10)
    (src / "robot" / "stats.json").write_text("{}")
    (src / "tokenizer.model").write_text("t")
    shard = faults.find_shard(str(src / "robot"), "train")
    faults.mirror(str(src), str(dst), [shard])
    copied = dst / "robot" / "r-train.array_record-00000-of-00001"
    assert copied.is_file() and not copied.is_symlink()
    assert (dst / "robot" / "stats.json").is_symlink() and (dst / "vl").is_symlink()
    assert (dst / "tokenizer.model").read_text() == "t"
    faults.corrupt_middle(str(copied), np.random.default_rng(0))
    assert (src / "robot" / "r-train.array_record-00000-of-00001").read_bytes() == b"x" * 10
