"""Policy server: a bundle's Policy behind a websocket, msgpack-numpy messages (docs/policy_protocol.md).

    python -m vla.serve --bundle BUNDLE [--host 127.0.0.1] [--port 8000] [--token_file PATH]

On connect the server sends the policy metadata; then every binary message is one request
(an observation, see check_request) and gets exactly one reply: the policy's output plus
"server_timing", or {"error": "..."} naming what was wrong. A bad request never closes the
connection or stops the server. Inference is serialized (one model) and runs off the event loop,
so other clients still connect and get their handshake while a request is being served.

The token (the contents of --token_file, or $VLA_SERVE_TOKEN; never a flag, since a command line
is visible to every user of the machine) is checked during the websocket handshake; a client
without it, or with another one, is refused with HTTP 401. GET /healthz answers 200 "OK"
without a token. The server binds 127.0.0.1 unless --host says otherwise.

Library use (tests, tools): `with PolicyServer(policy, port=0) as server: ... server.port`.
"""
import asyncio
import hmac
import http
import logging
import threading
import time
from typing import Any, Self

import numpy as np
from absl import app, flags
from absl import logging as absl_logging
from websockets.asyncio.server import Request, Response, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from data import transform
from vla import msgpack_numpy
from vla.client import TOKEN_ENV, read_token
from vla.policy import Policy

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
# Several cameras of history frames at full resolution stay far below this; it bounds what an
# unauthenticated or broken client can make the server buffer.
MAX_MESSAGE_BYTES = 64 * 2**20
OBSERVATION_KEYS = ("images", "state", "prompt")
OPTION_KEYS = ("rng_seed", "prefix_actions", "inference_delay")


class RequestError(ValueError):
    """A request the server refuses; the message is sent back to the client."""


# ------------------------------------------------------------------------------- requests

def check_request(request: Any, metadata: dict) -> tuple[dict, dict]:
    """A decoded request -> (observation, infer options) for Policy.infer, or RequestError.

    request: an observation, in the model's layout {"images": {cam: uint8 [h, w, 3] or [t, h, w,
    3]}, "state": float [S], "prompt": str} or in the robot's own (metadata["robot_spec"]'s keys,
    e.g. openpi's LIBERO client: "observation/image", "observation/wrist_image",
    "observation/state", "prompt"), plus the optional infer options "rng_seed" (int >= 0),
    "prefix_actions" (float [k, A_robot]) and "inference_delay" (int). This checks what the
    policy cannot: the message's shape, the option types, and (cheaply, before the prompt is
    tokenized) metadata["max_prompt_chars"]; Policy.infer checks the observation's contents
    (cameras, dtypes, shapes, the prompt's token count) before it runs the model.
    """
    if not isinstance(request, dict):
        raise RequestError(f"request must be a map, got {type(request).__name__}")
    robot_keys = list(transform.DatasetSpec.from_fields(metadata["robot_spec"]).client_keys()) \
        if "robot_spec" in metadata else []
    model_layout = "images" in request or not robot_keys
    keys = list(OBSERVATION_KEYS) if model_layout else [*robot_keys, "prompt"]
    # A nested observation ({"observation": {"image": ...}}) names its keys' first parts.
    allowed = {*keys, *(k.split("/")[0] for k in keys), *OPTION_KEYS}
    missing = [k for k in keys if k not in request and k.split("/")[0] not in request]
    if missing:
        also = "" if not robot_keys else f", or in the robot's layout {[*robot_keys, 'prompt']}"
        raise RequestError(f"request is missing {missing}; an observation has {list(OBSERVATION_KEYS)}{also}")
    unknown = sorted(str(k) for k in request if k not in allowed)
    if unknown:
        raise RequestError(f"unknown request key(s) {unknown}; allowed: {sorted(allowed)}")
    prompt = request["prompt"]
    if isinstance(prompt, str) and len(prompt) > metadata["max_prompt_chars"]:
        raise RequestError(f"prompt too long: {len(prompt)} characters, at most {metadata['max_prompt_chars']}")
    options = {k: request[k] for k in OPTION_KEYS if k in request}
    for key in ("rng_seed", "inference_delay"):
        value = options.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise RequestError(f"{key} must be a non-negative int, got {value!r}")
        if key in options:
            options[key] = int(value)
    return {k: v for k, v in request.items() if k not in OPTION_KEYS}, options


# ------------------------------------------------------------------------------- server

def _bearer_token(request: Request) -> str | None:
    """The token of an `Authorization: Bearer T` (or openpi's `Api-Key T`) header."""
    scheme, _, token = (request.headers.get("Authorization") or "").partition(" ")
    return token.strip() if scheme.lower() in ("bearer", "api-key") else None


class PolicyServer:
    """Serves one policy to any number of websocket clients, one inference at a time.

    policy: anything with Policy's `metadata` and `infer(observation, **options)` (vla.policy).
    port 0 picks a free port; `port` tells the bound one once started. Run it either blocking
    (`serve_forever()`, the CLI) or in a background thread (`start()` / `stop()`, or `with`).
    """

    def __init__(self, policy: Any, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
                 max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self.policy = policy
        self.host = host
        self.port = port
        self.metadata = {**policy.metadata, "protocol_version": PROTOCOL_VERSION}
        self._token = token.encode(errors="surrogateescape") if token else None
        self._max_message_bytes = max_message_bytes
        self._packer = msgpack_numpy.Packer()
        self._metadata_message = self._packer.pack(self.metadata)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._lock: asyncio.Lock | None = None  # made in the serving loop, which it belongs to

    # -- lifecycle

    def serve_forever(self) -> None:
        """Serve in this thread until interrupted (Ctrl-C)."""
        try:
            asyncio.run(self._serve())
        except KeyboardInterrupt:
            log.info("interrupted; server stopped")

    def start(self) -> Self:
        """Serve in a background thread; returns once the socket is bound (self.port is real)."""
        ready = threading.Event()
        failure = []

        def run() -> None:
            try:
                asyncio.run(self._serve(ready))
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                failure.append(e)
                ready.set()

        self._thread = threading.Thread(target=run, name="policy-server", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        """Close all connections and stop the background server."""
        if self._thread is None:
            return
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join()
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    async def _serve(self, ready: threading.Event | None = None) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        self._lock = asyncio.Lock()
        async with serve(self._handle, self.host, self.port, process_request=self._process_request,
                         compression=None, max_size=self._max_message_bytes) as server:
            self.port = server.sockets[0].getsockname()[1]
            log.info("serving policy on ws://%s:%d (%s); metadata (stats left out): %s", self.host,
                     self.port, "token required" if self._token else "no token",
                     {k: v for k, v in self.metadata.items() if k != "stats"})
            if ready is not None:
                ready.set()
            await self._stop.wait()

    # -- connections

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        if self._token is not None:
            token = _bearer_token(request)
            if token is None or not hmac.compare_digest(token.encode(errors="surrogateescape"), self._token):
                log.warning("refused %s: missing or wrong token", connection.remote_address)
                return connection.respond(http.HTTPStatus.UNAUTHORIZED, "missing or wrong token\n")
        return None

    async def _handle(self, connection: ServerConnection) -> None:
        peer = connection.remote_address
        log.info("client %s connected", peer)
        try:
            await connection.send(self._metadata_message)
            async for message in connection:
                await connection.send(await self._reply(message))
        except ConnectionClosed:
            pass
        log.info("client %s disconnected", peer)

    async def _reply(self, message: bytes | str) -> bytes:
        start = time.perf_counter()
        try:
            if isinstance(message, str):
                raise RequestError("expected a binary msgpack message, got a text frame")
            try:
                request = msgpack_numpy.unpackb(message)
            except Exception as e:  # msgpack raises several unrelated types on garbage
                raise RequestError(f"malformed message, not msgpack(-numpy): {type(e).__name__}: {e}") from e
            observation, options = check_request(request, self.metadata)
            async with self._lock:
                waited = time.perf_counter()
                out = await asyncio.to_thread(self.policy.infer, observation, **options)
                infer_ms = (time.perf_counter() - waited) * 1000
            reply = {**out, "server_timing": {"infer_ms": infer_ms, "wait_ms": (waited - start) * 1000,
                                              "total_ms": (time.perf_counter() - start) * 1000}}
            return self._packer.pack(reply)
        except ValueError as e:  # RequestError, and Policy.infer's own complaints about the observation
            log.warning("request refused: %s", e)
            return self._packer.pack({"error": str(e)})
        except Exception as e:
            log.exception("request failed")
            return self._packer.pack({"error": f"internal server error: {type(e).__name__}: {e}"})


# ------------------------------------------------------------------------------- command line

def main(argv: list[str]) -> None:
    """Loads the bundle's Policy and serves it until interrupted."""
    del argv
    f = flags.FLAGS
    try:
        token = read_token(f.token_file)  # before the bundle: a bad token file fails in a second, not a minute
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    start = time.perf_counter()
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax narrates every file it reads at INFO
    policy = Policy.from_bundle(f.bundle, warmup=True)
    absl_logging.set_verbosity(absl_logging.INFO)  # the address, metadata, clients, refusals
    log.info("loaded %s in %.1f s (%.1f s of it compiling)", f.bundle, time.perf_counter() - start,
             policy.warmup_s)
    PolicyServer(policy, f.host, f.port, token).serve_forever()


def define_flags() -> None:
    """The command line: python -m vla.serve --help."""
    flags.DEFINE_string("bundle", None, "Bundle directory written by tools.export (required).")
    flags.DEFINE_string("host", "127.0.0.1", "Network interface to bind: 127.0.0.1 serves this machine only, "
                        "0.0.0.0 every interface.")
    flags.DEFINE_integer("port", 8000, "TCP port to listen on (0 picks a free one, logged at start).")
    flags.DEFINE_string("token_file", None, "File holding the shared token clients must send in the handshake; "
                        f"clients without it get HTTP 401 (default: ${TOKEN_ENV}; neither set: no token needed). "
                        "There is no token flag: command lines are visible to every user.")
    flags.mark_flag_as_required("bundle")


if __name__ == "__main__":
    define_flags()
    app.run(main)
