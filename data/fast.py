"""FAST action tokenizer (Pertsch et al. 2025): DCT compression + BPE over action chunks.

encode, for a normalized chunk x [H, A]:
    coeffs = round(scale * dct(x, type=2, norm="ortho", axis=0))      int [H, A]
    flatten row-major, i.e. low frequencies first: every dim's DC term, then every dim's first
    frequency, ...; map each integer to one unicode character; BPE (SentencePiece) -> ids.
decode(tokens, H, A) inverts this and is exact for the rounded coefficients:
    decode(encode(x)) == idct(coeffs / scale, type=2, norm="ortho", axis=0)

Integers map to the CJK Unified Ideographs block (a contiguous run of 20992 ordinary letters, so
SentencePiece neither normalizes nor splits them); coefficients in [-10496, 10495] are
representable, far beyond what a normalized chunk produces. Byte fallback lets coefficients never
seen while fitting still encode exactly, as UTF-8 byte tokens.

Saved as a directory: bpe.model (the SentencePiece model) and fast.json (scale, vocab_size).

Command line: fit on an .npy of normalized chunks [N, H, A] and print fast_report on held-out ones:
    python -m data.fast --chunks chunks.npy [--vocab_size 1024] [--scale 10] [--heldout 0.1] \
        [--out runs/fast]
"""
import io
import json
import os
from collections.abc import Sequence

import numpy as np
import sentencepiece as spm
from absl import app, flags
from scipy.fft import dct, idct

_ALPHABET_START = 0x4E00
_ALPHABET_SIZE = 0x9FFF - 0x4E00 + 1
_ZERO = _ALPHABET_START + _ALPHABET_SIZE // 2  # the character of coefficient 0
_MIN_COEFF = _ALPHABET_START - _ZERO
_MAX_COEFF = _ALPHABET_START + _ALPHABET_SIZE - 1 - _ZERO
_N_BYTE_PIECES = 256

_MODEL_FILE = "bpe.model"
_CONFIG_FILE = "fast.json"


def _coefficients(chunk: np.ndarray, scale: float) -> np.ndarray:
    """[H, A] float -> [H, A] int64 rounded scaled DCT coefficients (DCT along time)."""
    chunk = np.asarray(chunk, dtype=np.float64)
    if chunk.ndim != 2:
        raise ValueError(f"action chunk must be [H, A], got shape {chunk.shape}")
    if not np.all(np.isfinite(chunk)):
        raise ValueError("action chunk contains NaN or inf")
    coeffs = np.round(scale * dct(chunk, type=2, norm="ortho", axis=0)).astype(np.int64)
    if coeffs.min() < _MIN_COEFF or coeffs.max() > _MAX_COEFF:
        raise ValueError(
            f"scaled DCT coefficients span [{coeffs.min()}, {coeffs.max()}], beyond the "
            f"representable [{_MIN_COEFF}, {_MAX_COEFF}]; are the actions normalized?"
        )
    return coeffs


def _to_text(coeffs: np.ndarray) -> str:
    return "".join(chr(_ZERO + int(c)) for c in coeffs.reshape(-1))


class FastTokenizer:
    """DCT + BPE action tokenizer; token ids are in [0, vocab_size)."""

    def __init__(self, model_proto: bytes, scale: float):
        self.scale = float(scale)
        self.model_proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self._sp.get_piece_size()

    def encode(self, chunk: np.ndarray) -> list[int]:
        """Normalized action chunk [H, A] -> FAST token ids."""
        return self._sp.encode(_to_text(_coefficients(chunk, self.scale)))

    def decode(self, tokens: Sequence[int], horizon: int, action_dim: int) -> np.ndarray:
        """FAST token ids -> action chunk float32 [horizon, action_dim].

        Tolerates malformed sequences from a model: ids outside the vocabulary and the unknown
        piece are dropped, characters that are not coefficients (broken byte sequences) read as
        0, and a wrong coefficient count is fixed by truncating or zero-padding at the end, which,
        low frequencies coming first, drops or zeroes the highest frequencies.
        """
        valid = [
            int(t)
            for t in tokens
            if 0 <= int(t) < self.vocab_size and not self._sp.is_unknown(int(t))
        ]
        codes = np.array([ord(ch) for ch in self._sp.decode(valid)], dtype=np.int64) - _ZERO
        codes[(codes < _MIN_COEFF) | (codes > _MAX_COEFF)] = 0
        n = horizon * action_dim
        coeffs = np.zeros(n, dtype=np.float64)
        coeffs[: min(n, codes.size)] = codes[:n]
        chunk = idct(coeffs.reshape(horizon, action_dim) / self.scale, type=2, norm="ortho", axis=0)
        return chunk.astype(np.float32)

    def save(self, path: str | os.PathLike) -> str:
        """Writes the tokenizer into directory `path` (created if needed); returns the path."""
        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, _MODEL_FILE), "wb") as f:
            f.write(self.model_proto)
        with open(os.path.join(path, _CONFIG_FILE), "w") as f:
            json.dump({"scale": self.scale, "vocab_size": self.vocab_size}, f)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FastTokenizer":
        """Reads a directory written by save; errors name the missing or broken file."""
        path = os.fspath(path)
        model_path = os.path.join(path, _MODEL_FILE)
        config_path = os.path.join(path, _CONFIG_FILE)
        for p in (model_path, config_path):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"FAST tokenizer file not found: {p}")
        with open(config_path) as f:
            config = json.load(f)
        with open(model_path, "rb") as f:
            proto = f.read()
        try:
            tokenizer = cls(proto, config["scale"])
        except RuntimeError as e:
            raise ValueError(f"not a valid SentencePiece model file: {model_path} ({e})") from e
        if tokenizer.vocab_size != config["vocab_size"]:
            raise ValueError(
                f"{model_path} has {tokenizer.vocab_size} pieces, {config_path} says "
                f"{config['vocab_size']}"
            )
        return tokenizer


def fit(chunks: np.ndarray, vocab_size: int = 1024, scale: float = 10.0) -> FastTokenizer:
    """Fits the BPE of a FAST tokenizer on normalized training chunks [N, H, A].

    vocab_size is exact: 1 unknown piece + 256 byte pieces + one piece per distinct coefficient
    + merges, so it must exceed 257 + the number of distinct coefficients.
    """
    chunks = np.asarray(chunks)
    if chunks.ndim != 3:
        raise ValueError(f"chunks must be [N, H, A], got shape {chunks.shape}")
    coeffs = [_coefficients(c, scale) for c in chunks]
    n_symbols = len(np.unique(np.concatenate([c.reshape(-1) for c in coeffs])))
    if vocab_size <= 1 + _N_BYTE_PIECES + n_symbols:
        raise ValueError(
            f"FAST vocab_size {vocab_size} leaves no room for merges: 1 unknown + "
            f"{_N_BYTE_PIECES} byte pieces + {n_symbols} distinct coefficients at scale {scale}"
        )
    buffer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter([_to_text(c) for c in coeffs]),
            model_writer=buffer,
            model_type="bpe",
            vocab_size=vocab_size,
            unk_id=0,
            bos_id=-1,
            eos_id=-1,
            pad_id=-1,
            byte_fallback=True,
            character_coverage=1.0,
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            split_by_unicode_script=False,
            max_sentence_length=1 << 24,  # a chunk is one "sentence" of H * A characters
            minloglevel=2,
        )
    except RuntimeError as e:
        raise ValueError(
            f"FAST BPE training on {len(chunks)} chunks with vocab_size {vocab_size} failed: {e}"
        ) from e
    return FastTokenizer(buffer.getvalue(), scale)


def fast_report(tokenizer: FastTokenizer, chunks: np.ndarray) -> dict:
    """Compression and round-trip error of `tokenizer` on chunks [N, H, A].

    Returns n_chunks, values_per_chunk (H * A), mean_tokens / max_tokens per chunk,
    compression (H * A / mean_tokens), and max_abs_error / rmse of decode(encode(x)) against x.
    """
    chunks = np.asarray(chunks, dtype=np.float64)
    _, horizon, action_dim = chunks.shape
    lengths, errors = [], []
    for chunk in chunks:
        tokens = tokenizer.encode(chunk)
        lengths.append(len(tokens))
        errors.append(tokenizer.decode(tokens, horizon, action_dim) - chunk)
    errors = np.stack(errors)
    mean_tokens = float(np.mean(lengths))
    return {
        "n_chunks": len(chunks),
        "values_per_chunk": horizon * action_dim,
        "mean_tokens": mean_tokens,
        "max_tokens": int(np.max(lengths)),
        "compression": horizon * action_dim / mean_tokens,
        "max_abs_error": float(np.max(np.abs(errors))),
        "rmse": float(np.sqrt(np.mean(errors**2))),
    }


def fit_and_report(chunks_file: str, vocab_size: int = 1024, scale: float = 10.0, heldout: float = 0.1,
                   out: str | None = None) -> dict:
    """The command line's work: fits on an .npy of normalized chunks [N, H, A] less the last `heldout`
    fraction (at least one chunk), saves the tokenizer in `out` if given, and returns fast_report
    on the held-out chunks."""
    chunks = np.load(chunks_file)
    n_fit = len(chunks) - max(1, round(heldout * len(chunks)))
    tokenizer = fit(chunks[:n_fit], vocab_size, scale)
    if out:
        tokenizer.save(out)
    return fast_report(tokenizer, chunks[n_fit:])


def main(argv: Sequence[str]) -> None:
    """Fits a FAST tokenizer; prints compression and round-trip error on held-out chunks as JSON."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {list(argv[1:])}; give the chunks file with --chunks")
    f = flags.FLAGS
    report = fit_and_report(f.chunks, f.vocab_size, f.scale, f.heldout, f.out)
    print(json.dumps(report, indent=2))


def define_flags() -> None:
    """The command line: python -m data.fast --help."""
    flags.DEFINE_string("chunks", None, ".npy file of normalized action chunks, float [N, H, A] (required).")
    flags.DEFINE_integer("vocab_size", 1024, "Exact vocabulary size of the fitted tokenizer; must exceed 1 unknown "
                         "+ 256 byte pieces + one per distinct coefficient in the fitting chunks.")
    flags.DEFINE_float("scale", 10.0, "DCT coefficients are multiplied by this before rounding to integers: "
                       "larger keeps more precision and makes more tokens.")
    flags.DEFINE_float("heldout", 0.1, "Fraction of the chunks (the last ones, at least one) left out of the fit "
                       "and reported on.")
    flags.DEFINE_string("out", None, "Directory to save the fitted tokenizer in (bpe.model, fast.json; default: "
                        "not saved).")
    flags.mark_flag_as_required("chunks")


if __name__ == "__main__":
    define_flags()
    app.run(main)
