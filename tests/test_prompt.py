"""Prompt layouts (π0 and π0.5; vla and openpi formats), truncation, state discretization,
reading targets back."""
import io

import numpy as np
import pytest
import sentencepiece as spm

from data.prompt import (
    build_tokens,
    decode_target,
    discretize_state,
    openpi_state_bins,
    parse_fast_from_tokens,
    parse_subtask,
    state_bins,
    undiscretize_state,
)
from data.tokenizer import OPENPI_FAST_SKIP, Tokenizer, train_sentencepiece
from tests.test_tokenizer import TEXT_VOCAB, generated_texts, with_tail

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


# ------------------------------------------------------------------ the openpi format
# Expectations below are built from openpi's format strings (openpi src/openpi/models/tokenizer.py,
# PaligemmaTokenizer.tokenize / FASTTokenizer.tokenize) and SentencePiece itself, not our code.
STATE = np.array([-1.7, -1.0, -0.3, 0.0, 0.5, 0.999, 1.0, 3.2])
STATE_TEXT = "-1 0 89 128 192 255 255 255"  # openpi's np.digitize bins, below -1 -> -1


def openpi_clean(prompt: str) -> str:
    """openpi PaligemmaTokenizer.tokenize's cleaning, as written there."""
    return prompt.strip().replace("_", " ").replace("\n", " ")


def _train_across_labels(path) -> str:
    """A BPE model trained on openpi prompts without splitting at script changes, so pieces
    such as ";\nAction:" and ".," span the places a prompt could be cut: encoding openpi's
    string in parts would give other ids than encoding it whole."""
    rng = np.random.default_rng(0)
    texts = generated_texts() + [
        f"Task: {t}, State: {' '.join(map(str, rng.integers(-1, 256, 8)))};\nAction: "
        for t in generated_texts(200, seed=5)]
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buffer, model_type="bpe",
        vocab_size=TEXT_VOCAB, pad_id=0, eos_id=1, bos_id=2, unk_id=3, byte_fallback=True,
        character_coverage=1.0, normalization_rule_name="identity", add_dummy_prefix=False,
        remove_extra_whitespaces=False, split_digits=True, split_by_unicode_script=False,
        hard_vocab_limit=False, minloglevel=2)
    path.write_bytes(buffer.getvalue())
    return str(path)


@pytest.fixture(scope="module")
def openpi(tmp_path_factory) -> tuple[Tokenizer, spm.SentencePieceProcessor]:
    """(openpi-layout tokenizer with a FAST range, the same model as plain SentencePiece). The
    model gets a tail of non-text pieces, as PaliGemma has, for the FAST ids to sit on."""
    d = tmp_path_factory.mktemp("openpi_tok")
    trained = _train_across_labels(d / "base.model")
    sp = spm.SentencePieceProcessor(model_file=trained)
    assert sp.encode(";\nAction: ") != sp.encode(";\n") + sp.encode("Action: ")
    n_sp = sp.get_piece_size()
    path = with_tail(trained, n_sp + N_FAST + OPENPI_FAST_SKIP, d / "tokenizer.model")
    return (Tokenizer(path, n_fast_tokens=N_FAST, id_layout="openpi"),
            spm.SentencePieceProcessor(model_file=path))


def _openpi(tok, prompt, target=None, max_len=L, state=STATE, fast=None) -> dict:
    bins = None if state is None else state_bins(state, "openpi")
    return build_tokens(tok, prompt, target, max_len, state_bins=bins, fast_tokens=fast,
                        prompt_format="openpi")


def test_openpi_state_bins_are_np_digitize_including_out_of_range():
    assert " ".join(map(str, openpi_state_bins(STATE))) == STATE_TEXT
    edges = np.linspace(-1, 1, 257)[:-1]
    x = np.random.default_rng(0).uniform(-1.5, 1.5, 1000)
    np.testing.assert_array_equal(openpi_state_bins(x), np.digitize(x, edges) - 1)
    # Inside [-1, 1] the vla bins agree; below -1 only openpi leaves the range.
    inside = x[np.abs(x) <= 1]
    np.testing.assert_array_equal(openpi_state_bins(inside), discretize_state(inside))
    assert state_bins(np.array([-2.0]), "vla").tolist() == [0]


def test_openpi_pi05_prompt_is_openpis(openpi):
    tok, sp = openpi
    out = _openpi(tok, "  Open_the drawer\nnear the wall. ", None)
    # openpi: cleaned = prompt.strip().replace("_", " ").replace("\n", " ")
    text = f"Task: Open the drawer near the wall., State: {STATE_TEXT};\nAction: "
    expected = sp.encode(text, add_bos=True)
    assert expected[0] == sp.bos_id() and sp.decode(expected) == text
    assert _valid(out) == expected and not out["truncated"]
    _check_masks(tok, out, len(expected), 0)


def test_openpi_pi05_prompt_is_truncated_like_openpi(openpi):
    tok, sp = openpi
    prompt = " ".join(generated_texts(6, seed=3))  # with "\n" and <locNNNN> in it
    full = sp.encode(f"Task: {openpi_clean(prompt)}, State: {STATE_TEXT};\nAction: ", add_bos=True)
    assert len(full) > 24
    out = _openpi(tok, prompt, None, max_len=24)
    assert out["tokens"].tolist() == full[:24] and out["token_mask"].all() and out["truncated"]
    exact = _openpi(tok, prompt, None, max_len=len(full))
    assert exact["tokens"].tolist() == full and not exact["truncated"]


def test_openpi_targets_follow_the_openpi_prefix(openpi):
    tok, sp = openpi
    prefix = sp.encode(f"Task: Push the puck, State: {STATE_TEXT};\nAction: ", add_bos=True)
    fast = [5, 0, 63, 12]
    fast_ids = [sp.get_piece_size() - 1 - 128 - k for k in fast]  # openpi's FAST id mapping
    # FAST alone: openpi's π0-FAST postfix, the prefix already ending with "Action: ".
    out = _openpi(tok, "Push the puck", None, fast=fast)
    target = fast_ids + sp.encode("|") + [sp.eos_id()]
    assert _valid(out) == prefix + target
    _check_masks(tok, out, len(prefix), len(target))
    assert parse_fast_from_tokens(tok, _valid(out)) == fast
    assert parse_subtask(decode_target(tok, out["tokens"], out["target_mask"])) is None
    # Subtask and FAST: "Subtask: ...\n" then "Action: " before the FAST ids.
    out = _openpi(tok, "Push the puck", "reach the puck", max_len=96, fast=fast)
    target = (sp.encode("Subtask: reach the puck\n") + sp.encode("Action: ") + fast_ids
              + sp.encode("|") + [sp.eos_id()])
    assert _valid(out) == prefix + target and not out["truncated"]
    text = decode_target(tok, out["tokens"], out["target_mask"])
    assert text == "Subtask: reach the puck\nAction: |" and parse_subtask(text) == "reach the puck"
    assert parse_fast_from_tokens(tok, _valid(out)) == fast
    # Subtask alone.
    out = _openpi(tok, "Push the puck", "reach the puck")
    assert _valid(out) == prefix + sp.encode("Subtask: reach the puck\n") + [sp.eos_id()]


def test_openpi_long_prompt_with_targets_cuts_the_prefix_keeps_targets(openpi):
    tok, sp = openpi
    prompt = " ".join(generated_texts(6, seed=3))  # with "\n" and <locNNNN> in it
    full = sp.encode(f"Task: {openpi_clean(prompt)}, State: {STATE_TEXT};\nAction: ", add_bos=True)
    fast = [1] * 8
    target = sp.encode("Subtask: press the button\n") + sp.encode("Action: ")
    target += [tok.fast_id(1)] * 8 + sp.encode("|") + [sp.eos_id()]
    out = _openpi(tok, prompt, "press the button", max_len=L, fast=fast)
    assert out["truncated"] and out["token_mask"].all()
    assert _valid(out) == full[: L - len(target)] + target
    with pytest.raises(ValueError, match="more than max_len"):
        _openpi(tok, prompt, "press the button", max_len=len(target), fast=fast)


def test_openpi_pi0_layout(openpi):
    tok, sp = openpi
    # openpi π0: encode(cleaned, add_bos=True) + encode("\n")
    prefix = sp.encode("caption en", add_bos=True) + sp.encode("\n")
    out = _openpi(tok, " caption_en", "A robot arm next to a red cup.", state=None)
    target = sp.encode("A robot arm next to a red cup.") + [sp.eos_id()]
    assert _valid(out) == prefix + target
    _check_masks(tok, out, len(prefix), len(target))
    long = " ".join(generated_texts(20, seed=2))
    full = sp.encode(openpi_clean(long), add_bos=True) + sp.encode("\n")
    cut = _openpi(tok, long, None, max_len=L, state=None)
    assert cut["tokens"].tolist() == full[:L] and cut["truncated"]
    with pytest.raises(ValueError, match="carries the state"):
        _openpi(tok, "push", None, state=None, fast=[1])
    with pytest.raises(ValueError, match="unknown prompt format"):
        build_tokens(tok, "push", None, L, prompt_format="openpi0")
