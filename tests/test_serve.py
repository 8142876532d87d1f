"""The policy server over real websockets: msgpack-numpy wire format, valid and malformed
requests, tokens (never on a command line), and the CLIs; the policy is the real bundle of tests/policy_fixtures.py."""
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request

import msgpack
import numpy as np
import pytest
from websockets.sync.client import connect

from vla import msgpack_numpy
from vla.client import TOKEN_ENV, PolicyClient, PolicyServerError, blank_observation, read_token
from vla.policy import Policy
from vla.serve import PolicyServer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN = "s3cret-token"


# ------------------------------------------------------------------------------- msgpack-numpy

@pytest.mark.parametrize("value", [
    np.arange(6, dtype=np.float32).reshape(2, 3), np.zeros((2, 0, 3), np.uint8), np.array(1.5),
    np.array([True, False]), np.array(["ab", "c"]), np.array([1, 2], dtype=">i8"),
    np.array([np.nan, np.inf]), np.arange(12, dtype=np.int16).reshape(3, 4).T,  # not contiguous
])
def test_msgpack_numpy_round_trips_arrays(value):
    out = msgpack_numpy.unpackb(msgpack_numpy.packb({"x": [value]}))["x"][0]
    assert out.dtype == value.dtype and out.shape == value.shape
    np.testing.assert_array_equal(out, value)


def test_msgpack_numpy_round_trips_scalars_and_plain_values():
    value = {"f": np.float32(2.5), "i": np.int64(-3), "b": np.bool_(True), "s": "text", "n": None,
             "l": [1, 2.0, b"raw"], "d": {"k": {}}}
    out = msgpack_numpy.unpackb(msgpack_numpy.packb(value))
    assert out == value
    assert [type(out[k]) for k in "fib"] == [np.float32, np.int64, np.bool_]


def test_msgpack_numpy_wire_format_is_openpis():
    raw = msgpack.unpackb(msgpack_numpy.packb({"a": np.array([[1, 2]], np.uint8), "s": np.float32(0.5)}))
    assert raw["a"] == {b"__ndarray__": True, b"data": b"\x01\x02", b"dtype": "|u1", b"shape": [1, 2]}
    assert raw["s"] == {b"__npgeneric__": True, b"data": 0.5, b"dtype": "<f4"}
    # What another implementation of the format sends decodes to the array it means.
    foreign = msgpack.packb({b"__ndarray__": True, b"dtype": "<f4", b"shape": [2],
                             b"data": np.array([1.0, -2.0], "<f4").tobytes()})
    np.testing.assert_array_equal(msgpack_numpy.unpackb(foreign), np.array([1.0, -2.0], np.float32))


@pytest.mark.parametrize("fields, match", [
    ({b"dtype": "|O", b"shape": [1], b"data": b"\0" * 8}, "unsupported array dtype"),
    ({b"dtype": "<f4", b"shape": [3], b"data": b"\0" * 8}, "needs 12 bytes, got 8"),
    ({b"dtype": "nonsense", b"shape": [1], b"data": b"\0"}, "unknown array dtype"),
    ({b"dtype": "<f4", b"shape": [-2], b"data": b""}, "shape must be non-negative ints"),
    ({b"dtype": "<f4", b"shape": 1, b"data": b""}, "shape must be a list"),
    ({b"dtype": 4, b"shape": [1], b"data": b"\0" * 4}, "dtype must be a string"),
    ({b"dtype": "<f4", b"shape": [1], b"data": "text"}, "data must be bytes"),
])
def test_msgpack_numpy_refuses_malformed_arrays(fields, match):
    with pytest.raises((TypeError, ValueError), match=match):
        msgpack_numpy.unpackb(msgpack.packb({b"__ndarray__": True, **fields}))
    with pytest.raises(ValueError, match="unsupported array dtype"):
        msgpack_numpy.packb(np.array([1j]))


# ------------------------------------------------------------------------------- the server

@pytest.fixture(scope="module")
def policy(bundle_dir):
    return Policy.from_bundle(bundle_dir, warmup=False)  # compiles what the tests use, on first use


@pytest.fixture(scope="module")
def server(policy):
    with PolicyServer(policy, port=0, token=TOKEN) as server:
        yield server


def _raw_connection(server, header="Bearer " + TOKEN):
    """A websocket with nothing of vla.client on top (a context manager)."""
    return connect(f"ws://127.0.0.1:{server.port}", additional_headers={"Authorization": header}, proxy=None)


def test_valid_request_gets_the_policys_actions(server, policy):
    observation = blank_observation(policy.metadata, "reach the goal")
    observation["state"] = np.linspace(-0.5, 0.5, policy.metadata["state_dim"]).astype(np.float32)
    with PolicyClient("127.0.0.1", server.port, token=TOKEN) as client:
        assert client.metadata == {**policy.metadata, "protocol_version": 1}
        out = client.infer(observation, rng_seed=7)
    m = policy.metadata
    assert out["actions"].shape == (m["action_horizon"], m["action_dim"]) and out["actions"].dtype == np.float32
    np.testing.assert_allclose(out["actions"], policy.infer(observation, rng_seed=7)["actions"], rtol=1e-6,
                               atol=1e-6)
    assert out["infer_ms"] > 0 and set(out["server_timing"]) == {"infer_ms", "wait_ms", "total_ms"}


def test_malformed_requests_get_error_replies_and_the_server_keeps_serving(server, policy):
    m = policy.metadata
    good = blank_observation(m)
    cam = m["cameras"][0]
    too_many_tokens = "go " * m["max_text_tokens"]
    assert len(too_many_tokens) <= m["max_prompt_chars"]  # so the policy's exact count refuses it
    cases = [
        (b"\xc1\x00", "malformed message, not msgpack"),
        ("a text frame", "binary msgpack message"),
        (msgpack_numpy.packb([1, 2]), "request must be a map"),
        ({"images": good["images"], "state": good["state"]}, r"missing \['prompt'\]"),
        ({**good, "temperature": 0.5}, r"unknown request key\(s\) \['temperature'\]"),
        ({**good, "images": {}}, f"camera '{cam}' missing"),
        ({**good, "images": {**good["images"], "elbow": good["images"][cam]}}, r"unknown camera\(s\) \['elbow'\]"),
        ({**good, "images": {**good["images"], cam: good["images"][cam].astype(np.float32)}},
         "must have dtype uint8, got float32"),
        ({**good, "images": {**good["images"], cam: good["images"][cam][..., 0]}}, r"must be \[h, w, 3\]"),
        ({**good, "state": np.zeros(m["state_dim"] + 1, np.float32)}, f"state must have shape \\[{m['state_dim']}\\]"),
        ({**good, "state": np.full(m["state_dim"], np.nan, np.float32)}, "state has non-finite values"),
        ({**good, "prompt": 3}, "prompt must be a string"),
        ({**good, "prompt": "x" * (m["max_prompt_chars"] + 1)}, "prompt too long: .* characters"),
        ({**good, "prompt": too_many_tokens}, "prompt too long: .* tokens"),
        ({**good, "rng_seed": -1}, "rng_seed must be a non-negative int"),
        ({**good, "prefix_actions": np.zeros((1, m["action_dim"] + 2), np.float32)}, "prefix_actions must be"),
        (msgpack.packb({"images": {cam: {b"__ndarray__": True, b"dtype": "|O", b"shape": [1], b"data": b"x" * 8}},
                        "state": [0.0], "prompt": ""}), "unsupported array dtype"),
    ]
    with _raw_connection(server) as ws:
        assert "cameras" in msgpack_numpy.unpackb(ws.recv())
        for request, match in cases:
            ws.send(request if isinstance(request, (bytes, str)) else msgpack_numpy.packb(request))
            reply = msgpack_numpy.unpackb(ws.recv())
            assert set(reply) == {"error"} and re.search(match, reply["error"]), (match, reply)
        ws.send(msgpack_numpy.packb(good))  # the same connection still works...
        assert msgpack_numpy.unpackb(ws.recv())["actions"].shape == (m["action_horizon"], m["action_dim"])
    with PolicyClient("127.0.0.1", server.port, token=TOKEN) as client:  # ...and so do new ones
        with pytest.raises(PolicyServerError, match="prompt must be a string"):
            client.infer({**good, "prompt": None})
        assert np.isfinite(client.infer(good)["actions"]).all()


def test_token_is_required_and_checked(server):
    for token in (None, "wrong-token", TOKEN + "x"):
        with pytest.raises(PolicyServerError, match="HTTP 401"):
            PolicyClient("127.0.0.1", server.port, token=token)
    with _raw_connection(server, header="Api-Key " + TOKEN) as ws:  # openpi_client's form
        assert "cameras" in msgpack_numpy.unpackb(ws.recv())
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=10) as response:
        assert response.status == 200  # no token needed to ask whether it is up


# ------------------------------------------------------------------------------- the token off the command line

def _token_file(tmp_path, text: str = TOKEN + "\n", mode: int = 0o600) -> str:
    path = tmp_path / "token"
    path.write_text(text)
    path.chmod(mode)
    return str(path)


def _env(**extra: str) -> dict:
    """The test's environment without a VLA_SERVE_TOKEN of its own."""
    return {**{k: v for k, v in os.environ.items() if k != TOKEN_ENV}, **extra}


def test_read_token_from_a_file_or_the_environment(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(TOKEN_ENV, "from-the-environment")
    assert read_token() == "from-the-environment"
    assert read_token(_token_file(tmp_path)) == TOKEN  # the file wins; its newline is dropped
    monkeypatch.delenv(TOKEN_ENV)
    assert read_token() is None
    assert not caplog.records
    assert read_token(_token_file(tmp_path, mode=0o644)) == TOKEN
    assert "readable by group or others" in caplog.text


@pytest.mark.parametrize("make_path, match", [
    (lambda d: str(d / "missing"), "cannot read"),
    (lambda d: str(d), "cannot read"),  # a directory
    (lambda d: _token_file(d, ""), "is empty"),
    (lambda d: _token_file(d, " \n"), "is empty"),
    (lambda d: _token_file(d, "a\nb\n"), "several lines"),
])
def test_read_token_refuses_a_bad_file_naming_it(tmp_path, make_path, match):
    path = make_path(tmp_path)
    with pytest.raises(ValueError, match=match) as error:
        read_token(path)
    assert path in str(error.value)


@pytest.mark.parametrize("module, args", [("vla.serve", ["--bundle", "no-such-bundle"]), ("vla.client", [])])
def test_clis_have_no_token_flag(module, args):
    proc = subprocess.run([sys.executable, "-m", module, *args, "--token", TOKEN], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Unknown command line flag 'token'" in proc.stderr


def test_client_cli_takes_the_token_from_a_file_or_the_environment(server, tmp_path):
    command = [sys.executable, "-m", "vla.client", "--port", str(server.port), "--n", "2"]
    run = lambda extra, env: subprocess.run(command + extra, cwd=REPO, env=env, capture_output=True, text=True,
                                            timeout=120)
    for extra, env in (["--token_file", _token_file(tmp_path)], _env()), ([], _env(**{TOKEN_ENV: TOKEN})):
        proc = run(extra, env)
        assert proc.returncode == 0 and "2 round trips" in proc.stdout, proc.stderr
    refused = run([], _env())
    assert refused.returncode != 0 and "HTTP 401" in refused.stderr


def test_cli_serves_a_bundle_with_the_token_from_a_file_never_on_its_command_line(bundle_dir, tmp_path):
    token_file = _token_file(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "vla.serve", "--bundle", bundle_dir, "--port", "0",
                             "--token_file", token_file], cwd=REPO, env=_env(), stderr=subprocess.PIPE, text=True)
    try:
        deadline, port, log = time.time() + 120, None, ""
        while port is None and time.time() < deadline:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "server exited before serving"
            log += line
            if match := re.search(r"serving policy on ws://127\.0\.0\.1:(\d+)", line):
                port = int(match.group(1))
        with open(f"/proc/{proc.pid}/cmdline", "rb") as fh:  # what `ps` shows every user of the machine
            cmdline = fh.read()
        assert token_file.encode() in cmdline and TOKEN.encode() not in cmdline and TOKEN not in log
        with pytest.raises(PolicyServerError, match="HTTP 401"):  # the token came from the file
            PolicyClient("127.0.0.1", port)
        with PolicyClient("127.0.0.1", port, token=TOKEN) as client:
            assert client.infer(blank_observation(client.metadata))["actions"].ndim == 2
    finally:
        proc.terminate()
        proc.wait(timeout=30)
