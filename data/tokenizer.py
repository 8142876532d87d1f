"""Text tokenizer: any SentencePiece model plus the VLA's special tokens and a FAST action range.

Special tokens (text strings that always encode to exactly one id):
    <loc0000> .. <loc1023>      box / point coordinates (PaliGemma convention)
    <state000> .. <state255>    discretized proprio state bins (π0.5 prompts of the "vla" format)

Two id layouts (Tokenizer's id_layout, set from config.data.prompt_format), n_sp = the
SentencePiece model's piece count:

"vla": every id says what it is.
    [0, n_sp)                       the model's own pieces, including every special token the
                                    model already defines (Gemma/PaliGemma: the loc tokens;
                                    models from train_sentencepiece: all of them)
    [n_sp, fast_offset)             the special tokens the model lacks, appended in canonical
                                    order (all loc tokens, then all state tokens; absent ones only)
    [fast_offset, vocab_size)       FAST action token k  ->  fast_offset + k,  k < n_fast_tokens
    vocab_size = n_sp + (appended specials) + n_fast_tokens   (rows of the model's embedding)

"openpi": openpi's π0-FAST convention, so an imported PaliGemma-vocabulary checkpoint keeps its
embedding rows (openpi models/tokenizer.py, FASTTokenizer._act_tokens_to_paligemma_tokens).
    [0, n_sp)                       the model's pieces; nothing is appended (state is text in
                                    openpi prompts; PaliGemma defines the loc tokens itself)
    FAST action token k  ->  n_sp - 1 - OPENPI_FAST_SKIP - k, so the FAST range
                                    [fast_offset, fast_offset + n_fast_tokens), fast_offset =
                                    n_sp - OPENPI_FAST_SKIP - n_fast_tokens, lies on the pieces
                                    just below the model's last OPENPI_FAST_SKIP
    vocab_size = n_sp
  The FAST range shares its ids with text pieces, as in π0-FAST: PaliGemma's with up to 1024
  FAST tokens are exactly its <loc0000>..<loc1023> pieces (ids 256,000..257,023). While FAST is
  on (n_fast_tokens > 0), those ids are read as FAST everywhere (is_fast, decode skips them, the
  model hides text targets >= fast_offset from the action expert), so use a model whose last
  n_fast_tokens + 128 pieces are not ordinary text (PaliGemma's are loc/seg tokens), and no box
  targets in FAST runs.

In both layouts fast_offset is the lowest FAST id and every FAST id lies in
[fast_offset, fast_offset + n_fast_tokens); the model takes fast_offset as fast_token_start.
fast_id(k) / fast_index(id) convert between FAST token k and its id.

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
ID_LAYOUTS = ("vla", "openpi")
# openpi's FASTTokenizer._fast_skip_tokens: PaliGemma's last 128 pieces (<seg000>..<seg127>) stay
# text, the FAST ids sit right below them.
OPENPI_FAST_SKIP = 128

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

    def __init__(self, path: str | os.PathLike, n_fast_tokens: int = 0, id_layout: str = "vla"):
        """path: a SentencePiece .model file. n_fast_tokens: the FAST tokenizer's vocab_size
        (0 when the model is not trained on discrete actions). id_layout: "vla" or "openpi"
        (module docstring)."""
        if id_layout not in ID_LAYOUTS:
            raise ValueError(f"unknown id layout {id_layout!r}; expected one of {ID_LAYOUTS}")
        self.path = os.fspath(path)
        self.id_layout = id_layout
        self._sp = load_sentencepiece(self.path)
        if self._sp.bos_id() < 0 or self._sp.eos_id() < 0:
            raise ValueError(f"SentencePiece model has no BOS/EOS piece: {self.path}")
        self.bos_id = self._sp.bos_id()
        self.eos_id = self._sp.eos_id()
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id
        self.n_sp = self._sp.get_piece_size()
        self._special_to_id: dict[str, int] = {}
        next_id = self.n_sp
        for token in SPECIAL_TOKENS:
            native = self._sp.piece_to_id(token)
            if self._sp.id_to_piece(native) == token:
                self._special_to_id[token] = native
            elif id_layout == "vla":
                self._special_to_id[token] = next_id
                next_id += 1
        self._appended = {i: t for t, i in self._special_to_id.items() if i >= self.n_sp}
        self.n_fast_tokens = n_fast_tokens
        if id_layout == "vla":
            self.fast_offset = next_id
            self.vocab_size = next_id + n_fast_tokens
        else:
            self.fast_offset = self.n_sp - OPENPI_FAST_SKIP - n_fast_tokens
            self.vocab_size = self.n_sp
            control = {self.bos_id, self.eos_id, self.pad_id, self._sp.unk_id()}
            if self.fast_offset < 0 or any(self.is_fast(i) for i in control):
                raise ValueError(
                    f"{n_fast_tokens} FAST tokens do not fit on the last ids of {self.path} "
                    f"({self.n_sp} pieces, the last {OPENPI_FAST_SKIP} skipped) without covering "
                    f"BOS/EOS/pad/unk ids {sorted(control)}")

    def encode(self, text: str) -> list[int]:
        """Text -> ids (no BOS/EOS). Special tokens always become their single id.

        "openpi" layout: exactly SentencePiece's encode of the whole string (what openpi's
        tokenizer does; nothing is appended, so there is nothing to cut at).
        "vla" layout: the text between special tokens is encoded on its own; with models that
        normalize whitespace (dummy prefix, extra-whitespace removal) spaces next to a special
        token follow that normalization. Gemma's and train_sentencepiece's models keep every
        character.
        """
        if self.id_layout == "openpi":
            return self._sp.encode(text)
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
            if i < self.n_sp and not self.is_fast(i):
                run.append(i)
                continue
            if run:
                pieces.append(self._sp.decode(run))
                run = []
            if i in self._appended:
                pieces.append(self._appended[i])
        if run:
            pieces.append(self._sp.decode(run))
        return "".join(pieces)

    def loc_id(self, i: int) -> int:
        """Id of <loc{i:04d}>, i in [0, 1024)."""
        if not 0 <= i < N_LOC_TOKENS:
            raise ValueError(f"loc index {i} outside [0, {N_LOC_TOKENS})")
        return self._special(LOC_TOKENS[i])

    def state_id(self, b: int) -> int:
        """Id of <state{b:03d}>, b in [0, 256)."""
        if not 0 <= b < N_STATE_BINS:
            raise ValueError(f"state bin {b} outside [0, {N_STATE_BINS})")
        return self._special(STATE_TOKENS[b])

    def _special(self, token: str) -> int:
        if token not in self._special_to_id:  # "openpi" layout, a model without the piece
            raise ValueError(f"{self.path} has no piece {token} and the {self.id_layout!r} id "
                             f"layout appends none")
        return self._special_to_id[token]

    def fast_id(self, k: int) -> int:
        """Model id of FAST action token k, k in [0, n_fast_tokens)."""
        if not 0 <= k < self.n_fast_tokens:
            raise ValueError(
                f"FAST token {k} outside [0, {self.n_fast_tokens}); construct the Tokenizer "
                "with n_fast_tokens = the FAST tokenizer's vocab_size"
            )
        if self.id_layout == "openpi":
            return self.n_sp - 1 - OPENPI_FAST_SKIP - k
        return self.fast_offset + k

    def fast_index(self, token_id: int) -> int:
        """FAST token k of a FAST id (the inverse of fast_id)."""
        if not self.is_fast(token_id):
            raise ValueError(f"token id {token_id} is not a FAST id")
        if self.id_layout == "openpi":
            return self.n_sp - 1 - OPENPI_FAST_SKIP - token_id
        return token_id - self.fast_offset

    def is_fast(self, token_id: int) -> bool:
        return self.fast_offset <= token_id < self.fast_offset + self.n_fast_tokens

    @classmethod
    def as_trained(cls, path: str | os.PathLike, id_layout: str, vocab_size: int,
                   fast_token_start: int | None) -> "Tokenizer":
        """The tokenizer a model was trained with, from what its checkpoint records (the
        tokenizer's vocab_size and the model's fast_token_start): its FAST range as wide."""
        base = cls(path, id_layout=id_layout)
        if id_layout == "vla":
            n_fast = vocab_size - base.vocab_size
        else:  # vocab_size is n_sp whatever the range; it grows down from base.fast_offset
            n_fast = 0 if fast_token_start is None else base.fast_offset - fast_token_start
        return cls(path, n_fast_tokens=n_fast, id_layout=id_layout) if n_fast > 0 else base
