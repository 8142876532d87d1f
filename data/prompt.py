r"""Fixed-length token sequences of the batch contract (tokens, token_mask, target_mask).

The prefix gets full attention and no loss; the target is causal and carries the loss
(target_mask); padding (pad_id) has token_mask false. Two prompt formats (config.data.prompt_format,
DataSpec.prompt_format); enc(s) is Tokenizer.encode(s).

"vla" (our own). Every part is encoded on its own, so the layout below is exact.

π0 layout (state_bins and fast_tokens both None): prompt is free text, target e.g. a caption.
    prefix   [BOS] enc(prompt) enc("\n")
    target   enc(target) [EOS]                               only when target is not None

π0.5 layout (state_bins or fast_tokens given): prompt is the task instruction, target the
subtask. The text reads "Task: {instruction}, State: {bins};\nSubtask: {subtask}\nAction: {FAST}|"
with absent parts left out:
    prefix   [BOS] enc("Task:") enc(" " + instruction)
             [enc(", State: ") <stateNNN> per bin]            when state_bins is given
             enc(";\n")
    target   [enc("Subtask: " + subtask + "\n")]              when target is not None
             [enc("Action: ") FAST ids enc("|")]              when fast_tokens is given
             [EOS]                                            when any target part is present
The cuts sit before spaces, where SentencePiece pieces start anyway, so encoding in parts costs
no extra tokens with word-initial-space vocabularies (Gemma's, train_sentencepiece's).

Too long for max_len: the prompt tokens (π0: enc(prompt); π0.5: enc(" " + instruction)) are cut
from the end and truncated=True; labels, state and targets are never cut, and when they alone
exceed max_len build_tokens raises ValueError.

"openpi": the prompt exactly as openpi's PaligemmaTokenizer.tokenize builds it (openpi
src/openpi/models/tokenizer.py at 15a9616), so imported π0 / π0.5 checkpoints see their own
prompts. clean(p) = p.strip().replace("_", " ").replace("\n", " ") (openpi's cleaning; no
lowercasing, which only openpi's π0-FAST tokenizer does). The prefix is ONE string encoded with
BOS, as openpi does (SentencePiece's encode(..., add_bos=True)), not in parts:

π0 layout (state_bins None):
    prefix   [BOS] enc(clean(prompt)) enc("\n")               openpi encodes the "\n" apart
    target   enc(target) [EOS]                                only when target is not None
π0.5 layout (state_bins given; openpi_state_bins / state_bins(..., "openpi") make them):
    prefix   [BOS] enc(f"Task: {clean(prompt)}, State: {' '.join(map(str, bins))};\nAction: ")
    target   [enc("Subtask: " + subtask + "\n")]              when target is not None
             [enc("Action: ") if a subtask precedes] FAST ids enc("|")   when fast_tokens given
             [EOS]                                            when any target part is present
The no-target prompt is openpi's π0.5 prompt token for token. Targets follow it, so that FAST ids
always come right after the text "Action: ": FAST alone reads "...;\nAction: {FAST}|" + EOS,
openpi's π0-FAST target text (its FASTTokenizer encodes "Action: " + ids + encode("|",
add_eos=True)); with a subtask, "...;\nAction: Subtask: {subtask}\nAction: {FAST}|" + EOS.

Too long for max_len: the prefix is cut from its end, as openpi cuts tokens[:max_len] (so with
no target the tokens are exactly openpi's), leaving room for the targets, which are never cut
(openpi's π0-FAST would cut them; a cut target trains on a wrong chunk); BOS stays. truncated
is set; targets that alone exceed max_len - 1 raise ValueError.
"""
from collections.abc import Sequence

import numpy as np

from data.tokenizer import N_STATE_BINS, Tokenizer

PROMPT_FORMATS = ("vla", "openpi")


def discretize_state(state: np.ndarray, n_bins: int = N_STATE_BINS) -> np.ndarray:
    """Normalized state [S] in [-1, 1] -> int32 bins [S] in [0, n_bins) ("vla" π0.5 prompts).

    The bins of openpi's np.digitize(state, np.linspace(-1, 1, n_bins + 1)[:-1]) - 1, except
    that values outside [-1, 1] fall into the edge bins instead of out of range.
    """
    state = np.clip(np.asarray(state, dtype=np.float64), -1.0, 1.0)
    return np.minimum(np.floor((state + 1.0) / 2.0 * n_bins), n_bins - 1).astype(np.int32)


def openpi_state_bins(state: np.ndarray) -> np.ndarray:
    """Normalized state [S] -> int64 bins [S] exactly as openpi digitizes it for π0.5 prompts:
    np.digitize(state, np.linspace(-1, 1, 257)[:-1]) - 1. Values below -1 give -1 (written "-1"
    in the prompt), values from 1 - 2/256 up (and NaN) give 255."""
    return np.digitize(state, bins=np.linspace(-1, 1, N_STATE_BINS + 1)[:-1]) - 1


def state_bins(state: np.ndarray, prompt_format: str) -> np.ndarray:
    """Normalized state [S] (the dataset's dims, before padding) -> the π0.5 prompt's bins [S]."""
    return openpi_state_bins(state) if prompt_format == "openpi" else discretize_state(state)


def undiscretize_state(bins: np.ndarray, n_bins: int = N_STATE_BINS) -> np.ndarray:
    """Bins [S] -> float32 bin centres [S]; within half a bin (1 / n_bins) of the input state."""
    return (-1.0 + (np.asarray(bins, dtype=np.float64) + 0.5) * 2.0 / n_bins).astype(np.float32)


def clean_openpi_prompt(prompt: str) -> str:
    """openpi's PaligemmaTokenizer cleaning of a prompt."""
    return prompt.strip().replace("_", " ").replace("\n", " ")


def build_tokens(
    tokenizer: Tokenizer,
    prompt: str,
    target: str | None,
    max_len: int,
    state_bins: np.ndarray | None = None,
    fast_tokens: Sequence[int] | None = None,
    prompt_format: str = "vla",
) -> dict:
    """One example's tokens in the documented layout of prompt_format, padded to max_len.

    state_bins: int [S] from state_bins(state, prompt_format). fast_tokens: FAST token indices
    (FastTokenizer ids, mapped here to model ids). Returns tokens int32 [L], token_mask bool [L],
    target_mask bool [L] and truncated (bool), L = max_len.
    """
    if prompt_format == "openpi":
        head, cuttable, tail, target_ids = _openpi_parts(tokenizer, prompt, target, state_bins,
                                                         fast_tokens)
    elif prompt_format == "vla":
        head, cuttable, tail, target_ids = _vla_parts(tokenizer, prompt, target, state_bins,
                                                      fast_tokens)
    else:
        raise ValueError(f"unknown prompt format {prompt_format!r}; expected one of "
                         f"{PROMPT_FORMATS}")

    fixed = len(head) + len(tail) + len(target_ids)
    if fixed > max_len:
        raise ValueError(
            f"target ({len(target_ids)} tokens) and prompt labels/state "
            f"({len(head) + len(tail)} tokens) need {fixed} tokens, more than max_len {max_len}"
        )
    truncated = fixed + len(cuttable) > max_len
    cuttable = cuttable[: max_len - fixed]
    prefix = head + cuttable + tail
    n = len(prefix) + len(target_ids)

    tokens = np.full(max_len, tokenizer.pad_id, dtype=np.int32)
    tokens[:n] = prefix + target_ids
    token_mask = np.arange(max_len) < n
    target_mask = token_mask & (np.arange(max_len) >= len(prefix))
    return {
        "tokens": tokens,
        "token_mask": token_mask,
        "target_mask": target_mask,
        "truncated": truncated,
    }


def _vla_parts(tokenizer: Tokenizer, prompt: str, target: str | None,
               state_bins: np.ndarray | None, fast_tokens: Sequence[int] | None) -> tuple:
    """(head, cuttable prompt, tail, target ids) of the "vla" format."""
    enc = tokenizer.encode
    if state_bins is None and fast_tokens is None:
        target_ids = [] if target is None else enc(target) + [tokenizer.eos_id]
        return [tokenizer.bos_id], enc(prompt), enc("\n"), target_ids
    tail = []
    if state_bins is not None:
        tail += enc(", State: ") + [tokenizer.state_id(int(b)) for b in state_bins]
    tail += enc(";\n")
    target_ids = []
    if target is not None:
        target_ids += enc(f"Subtask: {target}\n")
    if fast_tokens is not None:
        target_ids += enc("Action: ") + [tokenizer.fast_id(int(k)) for k in fast_tokens]
        target_ids += enc("|")
    if target_ids:
        target_ids.append(tokenizer.eos_id)
    return [tokenizer.bos_id] + enc("Task:"), enc(" " + prompt), tail, target_ids


def _openpi_parts(tokenizer: Tokenizer, prompt: str, target: str | None,
                  state_bins: np.ndarray | None, fast_tokens: Sequence[int] | None) -> tuple:
    """(head = [BOS], cuttable = the rest of openpi's prefix, no tail, target ids)."""
    enc, text = tokenizer.encode, clean_openpi_prompt(prompt)
    if state_bins is None:
        if fast_tokens is not None:
            raise ValueError("the openpi π0.5 prompt carries the state: FAST targets need "
                             "state_bins")
        target_ids = [] if target is None else enc(target) + [tokenizer.eos_id]
        return [tokenizer.bos_id], enc(text) + enc("\n"), [], target_ids
    state = " ".join(map(str, state_bins))
    target_ids = []
    if target is not None:
        target_ids += enc(f"Subtask: {target}\n")
    if fast_tokens is not None:
        target_ids += enc("Action: ") if target_ids else []  # else the prefix ends with it
        target_ids += [tokenizer.fast_id(int(k)) for k in fast_tokens] + enc("|")
    if target_ids:
        target_ids.append(tokenizer.eos_id)
    prefix = enc(f"Task: {text}, State: {state};\nAction: ")
    return [tokenizer.bos_id], prefix, [], target_ids


def _until_eos(tokenizer: Tokenizer, ids: np.ndarray) -> np.ndarray:
    eos = np.flatnonzero(ids == tokenizer.eos_id)
    return ids[: eos[0]] if eos.size else ids


def decode_target(tokenizer: Tokenizer, tokens: np.ndarray, target_mask: np.ndarray) -> str:
    """Text of the target positions [L] up to the first EOS, FAST ids left out.

    For a generated sequence, target_mask marks the generated positions.
    """
    ids = _until_eos(tokenizer, np.asarray(tokens)[np.asarray(target_mask, dtype=bool)])
    return tokenizer.decode([int(i) for i in ids if not tokenizer.is_fast(int(i))])


def parse_subtask(target_text: str) -> str | None:
    r"""The subtask in a π0.5 target text ("Subtask: {subtask}\n..."), None when absent."""
    label = "Subtask: "
    if not target_text.startswith(label):
        return None
    return target_text[len(label) :].split("\n", 1)[0]


def parse_fast_from_tokens(tokenizer: Tokenizer, tokens: Sequence[int]) -> list[int]:
    """FAST token indices (for FastTokenizer.decode) in a generated sequence, up to its first EOS.

    Text ids in between are ignored: no text id lies in the FAST id range (in the "openpi" id
    layout the range's pieces are not text while FAST is on: data/tokenizer.py), and
    FastTokenizer.decode copes with whatever length results.
    """
    ids = _until_eos(tokenizer, np.asarray(tokens))
    return [tokenizer.fast_index(int(i)) for i in ids if tokenizer.is_fast(int(i))]
