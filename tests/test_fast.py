"""FAST action tokenizer: exact round trip of the rounded DCT, compression, malformed input."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy.fft import dct, idct

from data.fast import FastTokenizer, fast_report, fit, fit_and_report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

H, A = 20, 6
SCALE = 10.0
VOCAB = 512


def smooth_chunks(n: int, seed: int) -> np.ndarray:
    """[n, H, A] sums of two sinusoids per dimension, within [-1, 1] like normalized actions."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, 1.0, H)[None, :, None, None]
    freq = rng.uniform(0.1, 1.5, (n, 1, A, 2))
    phase = rng.uniform(0.0, 2 * np.pi, (n, 1, A, 2))
    amp = rng.uniform(0.05, 0.5, (n, 1, A, 2))
    return np.sum(amp * np.sin(2 * np.pi * freq * t + phase), axis=-1)


def rounded_dct_reference(chunk: np.ndarray) -> np.ndarray:
    coeffs = np.round(SCALE * dct(chunk, type=2, norm="ortho", axis=0))
    return idct(coeffs / SCALE, type=2, norm="ortho", axis=0)


@pytest.fixture(scope="module")
def fast() -> FastTokenizer:
    return fit(smooth_chunks(300, seed=0), vocab_size=VOCAB, scale=SCALE)


def test_round_trip_is_exact_for_rounded_coefficients(fast):
    for chunk in smooth_chunks(50, seed=1):
        decoded = fast.decode(fast.encode(chunk), H, A)
        assert decoded.shape == (H, A) and decoded.dtype == np.float32
        np.testing.assert_allclose(decoded, rounded_dct_reference(chunk), atol=1e-6)


def test_coefficients_unseen_in_fit_still_round_trip(fast):
    chunk = smooth_chunks(1, seed=2)[0]
    chunk[H // 2] += 3.0  # a spike: high-frequency coefficients the fit never saw
    np.testing.assert_allclose(
        fast.decode(fast.encode(chunk), H, A), rounded_dct_reference(chunk), atol=1e-6
    )


def test_smooth_chunks_compress(fast):
    report = fast_report(fast, smooth_chunks(100, seed=3))
    assert fast.vocab_size == VOCAB
    assert report["values_per_chunk"] == H * A
    assert report["mean_tokens"] < 0.5 * H * A
    # The DCT is orthonormal: time-domain RMSE equals coefficient rounding RMSE <= 0.5 / scale.
    assert report["rmse"] < 0.5 / SCALE
    assert report["max_abs_error"] < 0.5


def test_malformed_sequences_decode_to_the_right_shape(fast):
    chunk = smooth_chunks(1, seed=4)[0]
    tokens = fast.encode(chunk)
    for bad in ([], tokens[:2], tokens * 3, [-1, 10**6, *tokens], [0, 0, 0], list(range(300))):
        assert fast.decode(bad, H, A).shape == (H, A)
    assert np.all(fast.decode([], H, A) == 0)
    # Low frequencies come first, all dims at once: the first A coefficients are the DC terms.
    dc = np.round(SCALE * dct(chunk, type=2, norm="ortho", axis=0)[0]) / SCALE
    np.testing.assert_allclose(fast.decode(tokens, 1, A)[0], dc, atol=1e-6)
    # Surplus coefficients are cut off, and out-of-vocabulary ids dropped.
    np.testing.assert_allclose(fast.decode(tokens + tokens, H, A), fast.decode(tokens, H, A))
    np.testing.assert_allclose(fast.decode([-1, *tokens, VOCAB], H, A), fast.decode(tokens, H, A))


def test_save_and_load(fast, tmp_path):
    loaded = FastTokenizer.load(fast.save(tmp_path / "fast"))
    chunk = smooth_chunks(1, seed=5)[0]
    assert loaded.encode(chunk) == fast.encode(chunk)
    assert loaded.scale == SCALE and loaded.vocab_size == VOCAB
    with pytest.raises(FileNotFoundError, match="bpe.model"):
        FastTokenizer.load(tmp_path / "nowhere")
    (tmp_path / "fast" / "bpe.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="bpe.model"):
        FastTokenizer.load(tmp_path / "fast")


def test_invalid_inputs_raise(fast):
    with pytest.raises(ValueError, match="normalized"):
        fast.encode(np.full((H, A), 1e5))
    with pytest.raises(ValueError, match=r"\[H, A\]"):
        fast.encode(np.zeros(H))
    with pytest.raises(ValueError, match="vocab_size 260"):
        fit(smooth_chunks(20, seed=6), vocab_size=260, scale=SCALE)


def test_command_line_fits_saves_and_reports(tmp_path):
    np.save(tmp_path / "chunks.npy", smooth_chunks(100, seed=7))
    out = str(tmp_path / "f")
    run = subprocess.run([sys.executable, "-m", "data.fast", "--chunks", str(tmp_path / "chunks.npy"),
                          "--vocab_size", "400", "--out", out], cwd=REPO, capture_output=True, text=True,
                         timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)
    assert report["n_chunks"] == 10 and "mean_tokens" in report
    assert FastTokenizer.load(tmp_path / "f").vocab_size == 400
    assert fit_and_report(str(tmp_path / "chunks.npy"), 400, heldout=0.2)["n_chunks"] == 20
