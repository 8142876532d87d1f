"""Text tokenizer: any SentencePiece model plus the VLA's special tokens and a FAST action range.

Special tokens (text strings that always encode to exactly one id):
    <loc0000> .. <loc1023>      box / point coordinates (PaliGemma convention)
    <state000> .. <state255>    discretized proprio state bins (π0.5 prompts)

Id layout, with n_sp = the SentencePiece model's piece count:

    [0, n_sp)                       the model's own pieces, including every special token the
                                    model already defines (Gemma/PaliGemma: the loc tokens;
                                    models from train_sentencepiece: all of them)
    [n_sp, fast_offset)             the special tokens the model lacks, appended in canonical
                                    order (all loc tokens, then all state tokens; absent ones only)
    [fast_offset, vocab_size)       FAST action token k  ->  fast_offset + k,  k < n_fast_tokens

    vocab_size = n_sp + (appended specials) + n_fast_tokens   (rows of the model's embedding)

π0-FAST overwrites the last ids of PaliGemma's vocabulary with action tokens; appending instead
keeps every text piece usable and the three ranges disjoint, so any id says what it is.

bos_id / eos_id come from the SentencePiece model; pad_id too, or eos_id when the model has no
pad piece (padding is masked out by token_mask, so any valid id serves).
"""
import io
import os
import re
from collections.abc import Iterable, Sequence

import sentencepiece as spm

N_LOC_TOKENS = 1024
N_STATE_BINS = 256
LOC_TOKENS = tuple(f"<loc{i:04d}>" for i in range(N_LOC_TOKENS))
STATE_TOKENS = tuple(f"<state{i:03d}>" for i in range(N_STATE_BINS))
SPECIAL_TOKENS = LOC_TOKENS + STATE_TOKENS

# Candidates only; a match is special when it is one of SPECIAL_TOKENS (e.g. <loc1500> is text).
_SPECIAL_PATTERN = re.compile(r"(<loc\d{4}>|<state\d{3}>)")


def train_sentencepiece(texts: Iterable[str], out_path: str | os.PathLike, vocab_size: int) -> str:
    """Trains a BPE SentencePiece model on `texts` and writes it to `out_path` (returned).

    `vocab_size` counts the text pieces (control, byte and learned pieces); the special tokens
    are added on top as user_defined_symbols, so the file holds vocab_size + 1280 pieces. The
    vocabulary may come out smaller when the corpus has too few distinct merges.

    Settings follow Gemma's tokenizer so the same prompt code serves both: pad 0, eos 1, bos 2,
    unk 3; identity normalization, no dummy prefix, whitespace kept (encoding a string in parts
    decodes to the same string); byte fallback (no unknown characters, exact round trips).
    """
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=buffer,
        model_type="bpe",
        vocab_size=vocab_size + len(SPECIAL_TOKENS),
        user_defined_symbols=list(SPECIAL_TOKENS),
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    out_path = os.fspath(out_path)
    with open(out_path, "wb") as f:
        f.write(buffer.getvalue())
    return out_path


def load_sentencepiece(path: str | os.PathLike) -> spm.SentencePieceProcessor:
    """Loads a SentencePiece model file, raising errors that name the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"SentencePiece model file not found: {path}")
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(path)
    except (OSError, RuntimeError) as e:
        raise ValueError(f"not a valid SentencePiece model file: {path} ({e})") from e
    return sp


class Tokenizer:
    """SentencePiece text tokenizer with loc/state special tokens and a FAST id range."""

    def __init__(self, path: str | os.PathLike, n_fast_tokens: int = 0):
        """path: a SentencePiece .model file. n_fast_tokens: the FAST tokenizer's vocab_size
        (0 when the model is not trained on discrete actions)."""
        self.path = os.fspath(path)
        self._sp = load_sentencepiece(self.path)
        if self._sp.bos_id() < 0 or self._sp.eos_id() < 0:
            raise ValueError(f"SentencePiece model has no BOS/EOS piece: {self.path}")
        self.n_sp = self._sp.get_piece_size()
        self._special_to_id: dict[str, int] = {}
        next_id = self.n_sp
        for token in SPECIAL_TOKENS:
            native = self._sp.piece_to_id(token)
            if self._sp.id_to_piece(native) == token:
                self._special_to_id[token] = native
            else:
                self._special_to_id[token] = next_id
                next_id += 1
        self._appended = {i: t for t, i in self._special_to_id.items() if i >= self.n_sp}
        self.fast_offset = next_id
        self.n_fast_tokens = n_fast_tokens
        self.vocab_size = next_id + n_fast_tokens
        self.bos_id = self._sp.bos_id()
        self.eos_id = self._sp.eos_id()
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id

    def encode(self, text: str) -> list[int]:
        """Text -> ids (no BOS/EOS). Special tokens always become their single id.

        The text between special tokens is encoded on its own; with models that normalize
        whitespace (dummy prefix, extra-whitespace removal) spaces next to a special token follow
        that normalization. Gemma's and train_sentencepiece's models keep every character.
        """
        ids: list[int] = []
        pending = ""
        # SentencePiece handles special tokens it defines, but appended ones are unknown to it,
        # so the text is cut at every special token and only the pieces between go through it.
        for part in _SPECIAL_PATTERN.split(text):
            special = self._special_to_id.get(part)
            if special is None:
                pending += part
                continue
            if pending:
                ids.extend(self._sp.encode(pending))
                pending = ""
            ids.append(special)
        if pending:
            ids.extend(self._sp.encode(pending))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text. BOS/EOS/pad and FAST action ids carry no text and are skipped."""
        pieces: list[str] = []
        run: list[int] = []
        for i in map(int, ids):
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} outside the vocabulary [0, {self.vocab_size})")
            if i < self.n_sp:
                run.append(i)
                continue
            if run:
                pieces.append(self._sp.decode(run))
                run = []
            if i < self.fast_offset:
                pieces.append(self._appended[i])
        if run:
            pieces.append(self._sp.decode(run))
        return "".join(pieces)

    def loc_id(self, i: int) -> int:
        """Id of <loc{i:04d}>, i in [0, 1024)."""
        if not 0 <= i < N_LOC_TOKENS:
            raise ValueError(f"loc index {i} outside [0, {N_LOC_TOKENS})")
        return self._special_to_id[LOC_TOKENS[i]]

    def state_id(self, b: int) -> int:
        """Id of <state{b:03d}>, b in [0, 256)."""
        if not 0 <= b < N_STATE_BINS:
            raise ValueError(f"state bin {b} outside [0, {N_STATE_BINS})")
        return self._special_to_id[STATE_TOKENS[b]]

    def fast_id(self, k: int) -> int:
        """Model id of FAST action token k, k in [0, n_fast_tokens)."""
        if not 0 <= k < self.n_fast_tokens:
            raise ValueError(
                f"FAST token {k} outside [0, {self.n_fast_tokens}); construct the Tokenizer "
                "with n_fast_tokens = the FAST tokenizer's vocab_size"
            )
        return self.fast_offset + k

    def is_fast(self, token_id: int) -> bool:
        return self.fast_offset <= token_id < self.vocab_size
