"""The policy server over real websockets: msgpack-numpy wire format, valid and malformed
requests, tokens, and the CLI; the policy is the real bundle of tests/policy_fixtures.py."""
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
from vla.client import PolicyClient, PolicyServerError, blank_observation
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


def test_cli_serves_a_bundle_with_the_token_from_the_environment(bundle_dir):
    env = {**os.environ, "VLA_SERVE_TOKEN": TOKEN}
    proc = subprocess.Popen([sys.executable, "-m", "vla.serve", "--bundle", bundle_dir, "--port", "0"],
                            cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline, port = time.time() + 120, None
        while port is None and time.time() < deadline:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "server exited before serving"
            if match := re.search(r"serving policy on ws://127\.0\.0\.1:(\d+)", line):
                port = int(match.group(1))
        with pytest.raises(urllib.error.HTTPError) as refused:  # the token came from the environment
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10)
        assert refused.value.code == 401
        with PolicyClient("127.0.0.1", port, token=TOKEN) as client:
            assert client.infer(blank_observation(client.metadata))["actions"].ndim == 2
    finally:
        proc.terminate()
        proc.wait(timeout=30)
