"""Windows on a hand-built 80 Hz episode: context frames, resampled chunks, masks, both ends."""
import numpy as np
import pytest

from data import resample, windows

N = 10  # native steps at 80 Hz


def _episode() -> windows.ArrayEpisode:
    j = np.arange(N, dtype=np.float32)
    grip = np.where(j >= 5, 1.0, -1.0).astype(np.float32)
    # dim 0 linear, dim 1 quadratic (so interpolation is visible), dim 2 a gripper.
    acts = np.stack([j, j * j, grip], -1)
    frames = np.broadcast_to(np.arange(N, dtype=np.uint8)[:, None, None, None], (N, 2, 2, 3))
    return windows.ArrayEpisode(frames={"cam": frames.copy()}, states=np.stack([j, -j], -1),
                                acts=acts, control_hz=80.0, instruction="do it")


def _spec(control_hz=20.0, horizon=4, frames=3, stride_s=0.05):
    return windows.WindowSpec(frames=frames, stride_s=stride_s, control_hz=control_hz,
                              horizon=horizon, cameras=("cam", "wrist"))


def test_80hz_to_20hz_start_of_episode():
    w = windows.make_window(_episode(), 0, _spec(), hold_dims=(2,))
    # 20 Hz = every 4th native step: positions 0, 4, 8, 12 (12 is past the end).
    np.testing.assert_array_equal(w["action_valid"], [True, True, True, False])
    np.testing.assert_allclose(w["actions"], [[0, 0, -1], [4, 16, -1], [8, 64, 1], [0, 0, 0]])
    # Context stride 0.05 s = 4 native steps: steps -8, -4, 0 -> clamped to 0 and masked.
    np.testing.assert_array_equal(w["frame_mask"], [False, False, True])
    np.testing.assert_array_equal(w["images"]["cam"][:, 0, 0, 0], [0, 0, 0])
    assert set(w["images"]) == {"cam"}  # the episode has no "wrist" camera
    np.testing.assert_allclose(w["state"], [0, 0])


def test_80hz_to_20hz_end_of_episode():
    ep = _episode()
    last = windows.make_window(ep, N - 1, _spec(), hold_dims=(2,))
    np.testing.assert_array_equal(last["action_valid"], [True, False, False, False])
    np.testing.assert_allclose(last["actions"], [[9, 81, 1], [0, 0, 0], [0, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(last["frame_mask"], [True, True, True])
    np.testing.assert_array_equal(last["images"]["cam"][:, 0, 0, 0], [1, 5, 9])
    np.testing.assert_allclose(last["state"], [9, -9])
    # Step 5 reaches the last step exactly (5 + 4 = 9): that action is kept, not dropped.
    mid = windows.make_window(ep, 5, _spec(), hold_dims=(2,))
    np.testing.assert_array_equal(mid["action_valid"], [True, True, False, False])
    np.testing.assert_allclose(mid["actions"][:2], [[5, 25, 1], [9, 81, 1]])
    np.testing.assert_array_equal(mid["frame_mask"], [False, True, True])
    np.testing.assert_array_equal(mid["images"]["cam"][:, 0, 0, 0], [0, 1, 5])


def test_fractional_ratio_interpolates_and_holds_gripper():
    # 80 Hz -> 30 Hz: positions 0, 8/3, 16/3, 8.
    w = windows.make_window(_episode(), 0, _spec(control_hz=30.0), hold_dims=(2,))
    np.testing.assert_array_equal(w["action_valid"], [True] * 4)
    expected = [[0, 0, -1], [8 / 3, 4 + 2 / 3 * 5, -1], [16 / 3, 25 + 1 / 3 * 11, 1], [8, 64, 1]]
    np.testing.assert_allclose(w["actions"], expected, rtol=1e-6)
    # Without hold the gripper is interpolated: step 2 + 8/3 lies between -1 (step 4) and 1 (5).
    w = windows.make_window(_episode(), 2, _spec(control_hz=30.0))
    np.testing.assert_allclose(w["actions"][1, 2], -1 + 2 / 3 * 2, rtol=1e-6)


def test_padding_masks_extra_dims():
    w = windows.make_window(_episode(), N - 2, _spec(), hold_dims=(2,))
    actions, mask = windows.pad_actions(w["actions"], w["action_valid"], 6)
    assert actions.shape == mask.shape == (4, 6)
    np.testing.assert_array_equal(mask[:, :3], [[True] * 3] + [[False] * 3] * 3)
    assert not mask[:, 3:].any() and not actions[:, 3:].any()
    np.testing.assert_allclose(windows.pad_state(w["state"], 5), [8, -8, 0, 0, 0])
    with pytest.raises(ValueError, match="action_dim"):
        windows.pad_actions(w["actions"], w["action_valid"], 2)


def test_stride_finer_than_native_period_is_an_error():
    with pytest.raises(ValueError, match="finer than the dataset's native period"):
        windows.make_window(_episode(), 3, _spec(stride_s=0.01))
    with pytest.raises(ValueError, match="native period"):
        _spec(stride_s=0.01).check(80.0)
    _spec(stride_s=1 / 80).check(80.0)  # exactly one native period is fine
    _spec(frames=1, stride_s=0.001).check(80.0)  # a single frame has no stride


def test_chunk_positions_stay_inside_episode():
    lo, hi, frac, valid = resample.chunk_positions(7, N, 80.0, 30.0, 5)
    assert lo.max() < N and hi.max() < N
    np.testing.assert_array_equal(valid, [True, False, False, False, False])


def test_in_memory_lowdim_gives_the_same_window():
    ep = _episode()
    lowdim = ep.steps(range(N))
    for step in range(N):
        a = windows.make_window(ep, step, _spec(control_hz=30.0), hold_dims=(2,))
        b = windows.make_window(ep, step, _spec(control_hz=30.0), hold_dims=(2,),
                                lowdim={k: lowdim[k] for k in ("state", "actions")})
        for k in ("frame_mask", "state", "actions", "action_valid"):
            np.testing.assert_array_equal(a[k], b[k])
        np.testing.assert_array_equal(a["images"]["cam"], b["images"]["cam"])


def test_window_carries_the_subtask_of_its_step():
    ep = _episode()
    assert "subtask" not in windows.make_window(ep, 3, _spec())  # none recorded
    phases = tuple("reach" if j < 6 else "push" for j in range(N))
    ep = windows.ArrayEpisode(ep.frames, ep.states, ep.acts, ep.control_hz, subtasks=phases)
    lowdim = {k: ep.steps(range(N))[k] for k in ("state", "actions")}
    for step in (0, 5, 6, N - 1):  # read per window and with the episode's low-dim in memory
        assert windows.make_window(ep, step, _spec())["subtask"] == phases[step]
        assert windows.make_window(ep, step, _spec(), lowdim=lowdim)["subtask"] == phases[step]


def test_hold_past_end_repeats_the_last_valid_action():
    last = windows.make_window(_episode(), N - 3, _spec(), hold_dims=(2,))
    np.testing.assert_array_equal(last["action_valid"], [True, False, False, False])
    held = windows.hold_past_end(last["actions"], last["action_valid"])
    np.testing.assert_allclose(held, [[7, 49, 1]] * 4)
    full = windows.make_window(_episode(), 0, _spec(), hold_dims=(2,))
    np.testing.assert_array_equal(windows.hold_past_end(full["actions"][:3], [True] * 3),
                                  full["actions"][:3])
