"""Text tokenizer: trained SentencePiece model, special tokens (native or appended), id layouts."""
import io

import numpy as np
import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from data.tokenizer import (
    LOC_TOKENS,
    N_LOC_TOKENS,
    N_STATE_BINS,
    OPENPI_FAST_SKIP,
    Tokenizer,
    train_sentencepiece,
)

TEXT_VOCAB = 512  # 4 control + 256 byte pieces + characters + merges


def generated_texts(n: int = 400, seed: int = 0) -> list[str]:
    """Instructions, captions with boxes, questions and narrations like the generator's."""
    rng = np.random.default_rng(seed)
    objects = ["red cup", "blue block", "drawer", "button", "green mug", "door handle", "puck"]
    verbs = ["pick up", "push", "open", "close", "press", "reach for", "slide"]
    places = ["on the left", "near the wall", "on the table", "to the goal", "slowly"]
    texts = []
    for i in range(n):
        obj, verb, place = rng.choice(objects), rng.choice(verbs), rng.choice(places)
        box = "".join(f"<loc{v:04d}>" for v in rng.integers(0, N_LOC_TOKENS, 4))
        texts.append(
            [
                f"{verb.capitalize()} the {obj} {place}.",
                f"A robot arm next to a {obj} {place}.",
                f"detect {obj}\n{box} {obj}",
                f"Where is the {obj}? It is {place}.",
                f"The gripper moves to the {obj} and tries to {verb} it, step {i}.",
            ][i % 5]
        )
    return texts


def _train_plain(tmp_path, user_defined: list[str]) -> str:
    """A model trained outside train_sentencepiece, with only the given special tokens."""
    buffer = io.BytesIO()
    kwargs = {"user_defined_symbols": user_defined} if user_defined else {}
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(generated_texts()),
        model_writer=buffer,
        model_type="bpe",
        vocab_size=TEXT_VOCAB + len(user_defined),
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        hard_vocab_limit=False,
        minloglevel=2,
        **kwargs,
    )
    path = tmp_path / "plain.model"
    path.write_bytes(buffer.getvalue())
    return str(path)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    return Tokenizer(train_sentencepiece(generated_texts(), path, TEXT_VOCAB))


def test_trained_model_defines_all_special_tokens(tokenizer):
    assert tokenizer.fast_offset == tokenizer.n_sp == tokenizer.vocab_size
    assert tokenizer.n_sp <= TEXT_VOCAB + N_LOC_TOKENS + N_STATE_BINS
    assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id) == (0, 1, 2)
    ids = [tokenizer.loc_id(i) for i in range(N_LOC_TOKENS)]
    ids += [tokenizer.state_id(b) for b in range(N_STATE_BINS)]
    assert len(set(ids)) == len(ids) and max(ids) < tokenizer.n_sp


def test_loc_tokens_encode_to_single_ids_and_decode_back(tokenizer):
    for i in (0, 7, 512, 1023):
        assert tokenizer.encode(LOC_TOKENS[i]) == [tokenizer.loc_id(i)]
    text = "detect red cup\n<loc0012><loc0345><loc0678><loc1023> red cup"
    ids = tokenizer.encode(text)
    locs = [tokenizer.loc_id(i) for i in (12, 345, 678, 1023)]
    start = ids.index(locs[0])
    assert ids[start : start + 4] == locs
    assert tokenizer.decode(ids) == text


def test_text_round_trips_including_unseen_characters(tokenizer):
    for text in generated_texts(20, seed=1) + ["Ünïcode ✓ <loc9999> <state999>\n  x"]:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_model_without_special_tokens_gets_appended_ids(tmp_path):
    tok = Tokenizer(_train_plain(tmp_path, []), n_fast_tokens=8)
    n_sp = tok.n_sp
    assert tok.loc_id(0) == n_sp and tok.loc_id(1023) == n_sp + 1023
    assert tok.state_id(0) == n_sp + N_LOC_TOKENS and tok.state_id(255) == tok.fast_offset - 1
    assert tok.vocab_size == n_sp + N_LOC_TOKENS + N_STATE_BINS + 8
    text = "Push the puck <loc0001><loc1022>, State: <state000><state255>;\nnext"
    ids = tok.encode(text)
    assert tok.loc_id(1) in ids and tok.state_id(255) in ids
    assert tok.decode(ids) == text
    assert tok.decode([tok.state_id(17)]) == "<state017>"


def test_model_with_loc_tokens_only_appends_state_tokens(tmp_path):
    # Gemma/PaliGemma's case: loc tokens in the model, state bins not.
    tok = Tokenizer(_train_plain(tmp_path, list(LOC_TOKENS)))
    assert max(tok.loc_id(i) for i in range(N_LOC_TOKENS)) < tok.n_sp
    assert [tok.state_id(b) for b in (0, 255)] == [tok.n_sp, tok.n_sp + 255]
    assert tok.vocab_size == tok.n_sp + N_STATE_BINS
    text = "<loc0004> box, State: <state042>"
    assert tok.decode(tok.encode(text)) == text


def test_fast_ids_follow_text_and_special_ids(tokenizer):
    tok = Tokenizer(tokenizer.path, n_fast_tokens=100)
    assert tok.vocab_size == tokenizer.vocab_size + 100
    assert tok.fast_id(0) == tok.fast_offset and tok.fast_id(99) == tok.vocab_size - 1
    assert tok.is_fast(tok.fast_id(5)) and not tok.is_fast(tok.bos_id)
    with pytest.raises(ValueError, match="FAST token 100"):
        tok.fast_id(100)
    hello = tok.encode("hello")
    assert tok.decode([tok.bos_id, *hello, tok.fast_id(3), tok.eos_id]) == "hello"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])


def test_missing_or_corrupt_model_file_is_named(tmp_path):
    missing = tmp_path / "missing.model"
    with pytest.raises(FileNotFoundError, match="missing.model"):
        Tokenizer(missing)
    corrupt = tmp_path / "corrupt.model"
    corrupt.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="corrupt.model"):
        Tokenizer(corrupt)


# ------------------------------------------------------------------ the "openpi" id layout
PALIGEMMA_PIECES = 257_152


def with_tail(path, n_pieces: int, out_path) -> str:
    """The SentencePiece model at path with user-defined pieces <tail0>, <tail1>, ... appended
    until it has n_pieces: a stand-in for PaliGemma's last pieces (loc / seg tokens), which no
    ordinary text encodes to, so the openpi FAST range covers no text of the tests."""
    proto = sentencepiece_model_pb2.ModelProto()
    with open(path, "rb") as f:
        proto.ParseFromString(f.read())
    for i in range(n_pieces - len(proto.pieces)):
        piece = proto.pieces.add()
        piece.piece, piece.score = f"<tail{i}>", 0.0
        piece.type = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    with open(out_path, "wb") as f:
        f.write(proto.SerializeToString())
    return str(out_path)


def test_openpi_layout_puts_fast_ids_on_the_last_pieces(tokenizer, tmp_path):
    n_fast = 100
    path = with_tail(tokenizer.path, tokenizer.n_sp + n_fast + OPENPI_FAST_SKIP, tmp_path / "t.model")
    tok = Tokenizer(path, n_fast_tokens=n_fast, id_layout="openpi")
    n_sp = spm.SentencePieceProcessor(model_file=path).get_piece_size()
    assert tok.n_sp == tok.vocab_size == n_sp  # nothing appended
    # openpi's _act_tokens_to_paligemma_tokens: vocab_size() - 1 - 128 - k.
    ids = [tok.fast_id(k) for k in range(n_fast)]
    assert ids == [n_sp - 1 - 128 - k for k in range(n_fast)]
    assert tok.fast_offset == min(ids) == n_sp - 128 - n_fast
    assert [tok.fast_index(i) for i in ids] == list(range(n_fast))
    is_fast = [tok.is_fast(i) for i in range(n_sp)]
    assert sum(is_fast) == n_fast and all(is_fast[i] for i in ids)
    assert not any(is_fast[n_sp - 128:]) and not tok.is_fast(tok.bos_id)
    with pytest.raises(ValueError, match="FAST token 100"):
        tok.fast_id(100)
    hello = tok.encode("hello")
    assert hello == spm.SentencePieceProcessor(model_file=path).encode("hello")
    assert tok.decode([tok.bos_id, *hello, tok.fast_id(3), tok.fast_id(99), tok.eos_id]) == "hello"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([n_sp])
    # The vla layout of the same file appends the FAST range instead.
    assert Tokenizer(path, n_fast_tokens=n_fast).fast_id(0) == n_sp


def test_openpi_layout_appends_no_special_tokens(tmp_path):
    path = _train_plain(tmp_path, list(LOC_TOKENS))  # PaliGemma's case: loc tokens, no state
    tok = Tokenizer(path, id_layout="openpi")
    assert tok.vocab_size == tok.n_sp == tok.fast_offset + OPENPI_FAST_SKIP
    assert max(tok.loc_id(i) for i in range(N_LOC_TOKENS)) < tok.n_sp
    with pytest.raises(ValueError, match="has no piece <state003>"):
        tok.state_id(3)
    assert Tokenizer(path).vocab_size == tok.n_sp + N_STATE_BINS  # vla appends state tokens
    with pytest.raises(ValueError, match="do not fit on the last ids"):
        Tokenizer(path, n_fast_tokens=tok.n_sp, id_layout="openpi")
    with pytest.raises(ValueError, match="unknown id layout"):
        Tokenizer(path, id_layout="paligemma")


def test_as_trained_recovers_the_fast_range(tokenizer):
    for layout in ("vla", "openpi"):
        trained = Tokenizer(tokenizer.path, n_fast_tokens=64, id_layout=layout)
        again = Tokenizer.as_trained(tokenizer.path, layout, trained.vocab_size, trained.fast_offset)
        assert (again.n_fast_tokens, again.fast_offset, again.vocab_size) == (
            64, trained.fast_offset, trained.vocab_size)
        assert Tokenizer.as_trained(tokenizer.path, layout, tokenizer.vocab_size, None).n_fast_tokens == 0


def test_pi05_config_with_paligemma_sized_tokenizer_passes_the_vocab_check(tokenizer, tmp_path):
    """configs/pi05.py (openpi prompts, FAST targets) with a 257,152-piece SentencePiece model,
    like PaliGemma's: the tokenizer's ids fit model.vocab_size; in the vla layout they would not."""
    from configs import pi05, specs
    from vla.train import validate_data

    spec = specs.build(pi05.get_config("pretrain"))
    assert spec.data.prompt_format == "openpi" and spec.model.vocab_size == PALIGEMMA_PIECES
    path = with_tail(tokenizer.path, PALIGEMMA_PIECES, tmp_path / "paligemma_sized.model")
    n_fast = spec.data.fast.vocab_size
    tok = Tokenizer(path, n_fast_tokens=n_fast, id_layout=spec.data.prompt_format)
    assert tok.vocab_size == PALIGEMMA_PIECES
    # PaliGemma: FAST tokens 0..1023 land on ids 257,023 .. 256,000 (its <loc> pieces).
    assert (tok.fast_id(0), tok.fast_id(n_fast - 1)) == (257_023, 256_000)
    validate_data(spec.model, tok.vocab_size)
    appended = Tokenizer(path, n_fast_tokens=n_fast)
    with pytest.raises(ValueError, match="smaller than the tokenizer's vocab_size"):
        validate_data(spec.model, appended.vocab_size)
