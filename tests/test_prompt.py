"""Prompt layouts (π0 and π0.5), truncation, state discretization, reading targets back."""
import numpy as np
import pytest

from data.prompt import (
    build_tokens,
    decode_target,
    discretize_state,
    parse_fast_from_tokens,
    parse_subtask,
    undiscretize_state,
)
from data.tokenizer import Tokenizer, train_sentencepiece
from tests.test_tokenizer import TEXT_VOCAB, generated_texts

N_FAST = 64
L = 64


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    return Tokenizer(train_sentencepiece(generated_texts(), path, TEXT_VOCAB), n_fast_tokens=N_FAST)


def _valid(out: dict) -> list[int]:
    return out["tokens"][out["token_mask"]].tolist()


def _check_masks(tok, out: dict, n_prefix: int, n_target: int):
    n = n_prefix + n_target
    assert out["tokens"].shape == out["token_mask"].shape == out["target_mask"].shape == (L,)
    assert out["tokens"].dtype == np.int32
    assert out["token_mask"].tolist() == [True] * n + [False] * (L - n)
    assert out["target_mask"].tolist() == [False] * n_prefix + [True] * n_target + [False] * (L - n)
    assert np.all(out["tokens"][n:] == tok.pad_id)


def test_pi0_layout(tok):
    prompt, target = "caption en", "A robot arm next to a red cup."
    out = build_tokens(tok, prompt, target, L)
    prefix = [tok.bos_id] + tok.encode(prompt) + tok.encode("\n")
    target_ids = tok.encode(target) + [tok.eos_id]
    assert _valid(out) == prefix + target_ids
    _check_masks(tok, out, len(prefix), len(target_ids))
    assert not out["truncated"]
    assert decode_target(tok, out["tokens"], out["target_mask"]) == target


def test_pi0_without_target_is_all_prefix(tok):
    out = build_tokens(tok, "Open the drawer", None, L)
    assert _valid(out) == [tok.bos_id] + tok.encode("Open the drawer") + tok.encode("\n")
    assert not out["target_mask"].any()


def test_pi05_layout_with_state_subtask_and_fast(tok):
    instruction, subtask = "Open the drawer near the wall", "reach for the door handle"
    bins, fast = np.array([0, 17, 255]), [5, 0, 63, 12]
    out = build_tokens(tok, instruction, subtask, L, state_bins=bins, fast_tokens=fast)
    state_ids = [tok.state_id(b) for b in bins]
    prefix = [tok.bos_id] + tok.encode("Task:") + tok.encode(" " + instruction)
    prefix += tok.encode(", State: ") + state_ids + tok.encode(";\n")
    fast_ids = [tok.fast_id(k) for k in fast]
    target = tok.encode(f"Subtask: {subtask}\n") + tok.encode("Action: ") + fast_ids
    target += tok.encode("|") + [tok.eos_id]
    assert _valid(out) == prefix + target
    _check_masks(tok, out, len(prefix), len(target))
    # The text is the documented prompt; FAST ids carry no text.
    assert tok.decode(_valid(out)) == (
        f"Task: {instruction}, State: <state000><state017><state255>;\n"
        f"Subtask: {subtask}\nAction: |"
    )
    text = decode_target(tok, out["tokens"], out["target_mask"])
    assert parse_subtask(text) == subtask
    assert parse_fast_from_tokens(tok, _valid(out)) == fast


def test_pi05_parts_follow_the_example(tok):
    state_only = build_tokens(tok, "Push the puck", None, L, state_bins=np.array([3]))
    assert tok.decode(_valid(state_only)) == "Task: Push the puck, State: <state003>;\n"
    assert not state_only["target_mask"].any()

    fast_only = build_tokens(tok, "Push the puck", None, L, fast_tokens=[1, 2])
    prefix = [tok.bos_id] + tok.encode("Task:") + tok.encode(" Push the puck") + tok.encode(";\n")
    target = tok.encode("Action: ") + [tok.fast_id(1), tok.fast_id(2)] + tok.encode("|")
    assert _valid(fast_only) == prefix + target + [tok.eos_id]
    _check_masks(tok, fast_only, len(prefix), len(target) + 1)
    assert parse_subtask(decode_target(tok, fast_only["tokens"], fast_only["target_mask"])) is None


def test_long_prompt_is_truncated_and_flagged_targets_kept(tok):
    prompt = " ".join(generated_texts(20, seed=2))
    target = "The gripper moves to the red cup."
    out = build_tokens(tok, prompt, target, L)
    assert out["truncated"] and out["token_mask"].all()
    assert decode_target(tok, out["tokens"], out["target_mask"]) == target
    n_target = len(tok.encode(target)) + 1
    prefix = out["tokens"][: L - n_target].tolist()
    assert prefix[0] == tok.bos_id and prefix[-len(tok.encode("\n")) :] == tok.encode("\n")

    bins, state_ids = np.arange(8), [tok.state_id(b) for b in range(8)]
    out05 = build_tokens(tok, prompt, "press the button", L, state_bins=bins, fast_tokens=[1] * 8)
    assert out05["truncated"]
    tokens = out05["tokens"].tolist()
    start = tokens.index(state_ids[0])
    assert tokens[start : start + 8] == state_ids
    text = decode_target(tok, out05["tokens"], out05["target_mask"])
    assert text == "Subtask: press the button\nAction: |"
    assert parse_fast_from_tokens(tok, tokens) == [1] * 8


def test_target_that_cannot_fit_raises(tok):
    with pytest.raises(ValueError, match="more than max_len 8"):
        build_tokens(tok, "caption", "A robot arm next to a red cup on the table.", 8)
    with pytest.raises(ValueError, match="max_len 16"):
        build_tokens(tok, "Push", None, 16, state_bins=np.zeros(20, dtype=int))


def test_parse_fast_stops_at_eos(tok):
    ids = [tok.bos_id, tok.fast_id(4), 7, tok.fast_id(9), tok.eos_id, tok.fast_id(1)]
    assert parse_fast_from_tokens(tok, ids) == [4, 9]


def test_state_discretization_round_trip():
    rng = np.random.default_rng(0)
    state = rng.uniform(-1.0, 1.0, 1000)
    bins = discretize_state(state)
    assert bins.dtype == np.int32 and bins.min() >= 0 and bins.max() <= 255
    assert np.all(np.abs(undiscretize_state(bins) - state) <= 1.0 / 256 + 1e-6)
    assert discretize_state(np.array([-1.0, 1.0, -3.0, 3.0])).tolist() == [0, 255, 0, 255]
    assert discretize_state(np.array([0.0]), n_bins=4).tolist() == [2]
