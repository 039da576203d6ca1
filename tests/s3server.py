"""A real S3 protocol server (moto) on loopback, in a process of its own.

Its own process, not moto's in-process ThreadedMotoServer: deltalake's
``DeltaTable.restore`` holds the GIL while it waits for the server, so a
server thread in the same Python process can never answer it (a deadlock).
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MOTO = str(Path(sys.executable).parent / "moto_server")
KEY = SECRET = "testing"
REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS environment pointing at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_REGION": REGION}

    @property
    def options(self) -> dict:
        """The same as fsspec/s3fs storage options."""
        return {"key": KEY, "secret": SECRET,
                "client_kwargs": {"endpoint_url": self.endpoint, "region_name": REGION}}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=KEY, aws_secret_access_key=SECRET)

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)


def moto_missing() -> str | None:
    if not Path(MOTO).exists():
        return "moto_server is not installed (pip install 'moto[server]')"
    try:
        import s3fs  # noqa: F401
    except ImportError:
        return "s3fs is not installed"
    return None


@contextlib.contextmanager
def run_moto(log: Path) -> Iterator[S3Server]:
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen([MOTO, "-H", "127.0.0.1", "-p", str(port)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = log.read_text()[-500:]
                    raise RuntimeError(f"moto_server did not start: {tail}") from None
                time.sleep(0.05)
        yield S3Server(f"http://127.0.0.1:{port}", proc)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def moto_bucket(tmp_path_factory, bucket: str) -> Iterator[S3Server]:
    """A moto server (for a test module) with ``bucket`` created; skips the tests when
    moto cannot run here."""
    import pytest

    why = moto_missing()
    if why:
        pytest.skip(why)
    with run_moto(tmp_path_factory.mktemp("moto") / "moto.log") as server:
        server.create_bucket(bucket)
        yield server
