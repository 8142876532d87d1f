"""A small synchronous client of the policy server (vla/serve.py, docs/policy_protocol.md).

    client = PolicyClient("127.0.0.1", 8000, token=None)
    client.metadata                       # the policy metadata the server sent on connect
    out = client.infer({"images": {...}, "state": ..., "prompt": "..."}, rng_seed=0)
    out["actions"]                        # f32 [H, A_native]; out["server_timing"]["infer_ms"]
    client.close()

A refused request raises PolicyServerError with the server's message; the connection stays
usable. infer() is one send and one receive, so timing it measures the round trip.

Round-trip latency against a running server, with blank observations built from its metadata:

    python -m vla.client [--host 127.0.0.1] [--port 8000] [--token_file PATH] [--n 100]

The command lines take no token, only a file holding one (or $VLA_SERVE_TOKEN): a command line is
visible to every user of the machine (ps, /proc/PID/cmdline). read_token is how both CLIs get it.
"""
import contextlib
import logging
import os
import stat
import time
from typing import Any, Self

import numpy as np
from absl import app, flags
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect

from vla import msgpack_numpy

log = logging.getLogger(__name__)

TOKEN_ENV = "VLA_SERVE_TOKEN"


def read_token(token_file: str | None = None) -> str | None:
    """The shared token: token_file's contents if given, else $VLA_SERVE_TOKEN, else None (no token).

    Surrounding whitespace (the file's trailing newline) is dropped, as HTTP drops it from the
    Authorization header, so a token keeping it could never match. A missing, unreadable or empty
    file, or one of several lines, raises ValueError naming it: serving without the token meant, or
    with one no client can send, would fail later and less clearly. A file that group or others
    may read is only warned about, since it still keeps the token off the command line.
    """
    if token_file is None:
        return os.environ.get(TOKEN_ENV) or None
    try:
        with open(token_file, encoding="utf-8") as fh:
            mode = os.fstat(fh.fileno()).st_mode
            token = fh.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the token file {token_file}: {e}") from e
    if not token:
        raise ValueError(f"the token file {token_file} is empty")
    if "\n" in token or "\r" in token:
        raise ValueError(f"the token file {token_file} holds several lines; it must hold the token alone")
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("the token file %s is readable by group or others (%s); chmod 600 it", token_file,
                    stat.filemode(mode))
    return token


class PolicyServerError(RuntimeError):
    """The server answered with an error (its message is this exception's message), or refused us."""


class PolicyClient:
    """One websocket connection to a policy server; not thread-safe (one request at a time)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
                 open_timeout: float = 10.0) -> None:
        self.uri = f"ws://{host}:{port}"
        headers = {"Authorization": f"Bearer {token}"} if token else None
        # connect() is a context manager (calling it bare is deprecated); this one lasts until close().
        self._exit = contextlib.ExitStack()
        try:
            # No proxy: the policy server sits next to the robot; compression only costs latency.
            self._ws: ClientConnection = self._exit.enter_context(connect(
                self.uri, additional_headers=headers, compression=None, max_size=None, proxy=None,
                open_timeout=open_timeout))
        except InvalidStatus as e:
            status = e.response.status_code
            reason = (e.response.body or b"").decode(errors="replace").strip()
            raise PolicyServerError(f"{self.uri} refused the connection (HTTP {status}): {reason}") from e
        self._packer = msgpack_numpy.Packer()
        self.metadata: dict = msgpack_numpy.unpackb(self._ws.recv())

    def infer(self, observation: dict, **options: Any) -> dict:
        """observation {"images", "state", "prompt"} (+ options rng_seed, prefix_actions,
        inference_delay) -> {"actions": f32 [H, A_native], "subtask", "infer_ms", "server_timing"}."""
        self._ws.send(self._packer.pack({**observation, **options}))
        reply = msgpack_numpy.unpackb(self._ws.recv())
        if "error" in reply:
            raise PolicyServerError(reply["error"])
        return reply

    def close(self) -> None:
        self._exit.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def blank_observation(metadata: dict, prompt: str = "do the task") -> dict:
    """A valid observation for a policy's metadata: black frames, zero state."""
    size = metadata["image_size"]
    return {"images": {cam: np.zeros((size, size, 3), np.uint8) for cam in metadata["cameras"]},
            "state": np.zeros(metadata["state_dim"], np.float32), "prompt": prompt}


def round_trips_ms(client: PolicyClient, n: int, observation: dict | None = None) -> np.ndarray:
    """n timed infer() calls (after one untimed): round-trip milliseconds, float64 [n]."""
    observation = observation or blank_observation(client.metadata)
    client.infer(observation)
    times = np.empty(n)
    for i in range(n):
        start = time.perf_counter()
        client.infer(observation)
        times[i] = (time.perf_counter() - start) * 1e3
    return times


def main(argv: list[str]) -> None:
    """Times round trips to a running server and prints median, p99 and max milliseconds."""
    del argv
    f = flags.FLAGS
    try:
        token = read_token(f.token_file)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    with PolicyClient(f.host, f.port, token) as client:
        ms = round_trips_ms(client, f.n)
    p50, p99 = np.percentile(ms, [50, 99])
    print(f"{f.n} round trips to {client.uri}: median {p50:.2f} ms, p99 {p99:.2f} ms, max {ms.max():.2f} ms")


def define_flags() -> None:
    """The command line: python -m vla.client --help."""
    flags.DEFINE_string("host", "127.0.0.1", "Address (host name or IP) of the policy server.")
    flags.DEFINE_integer("port", 8000, "TCP port of the policy server.")
    flags.DEFINE_string("token_file", None, "File holding the shared token, if the server wants one (default: "
                        f"${TOKEN_ENV}). There is no token flag: command lines are visible to every user.")
    flags.DEFINE_integer("n", 100, "Number of timed requests (after one untimed warm-up request).")


if __name__ == "__main__":
    define_flags()
    app.run(main)
