"""`lake listen` as its own process, for the tests: started on a free loopback port,
stopped with SIGTERM as a service manager would."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from tests.pacs import free_port


@contextlib.contextmanager
def lake_listen(lake: Path, *, file_size_limit: int | None = None
                ) -> Iterator[tuple[subprocess.Popen, int]]:
    """The installed `lake listen` on ``lake`` (AE title LAKE, one batch a minute), once it
    says it listens: the process and its port. Killed on exit if still running. With
    ``file_size_limit``, no file it writes grows beyond that many bytes (RLIMIT_FSIZE:
    a write past it fails, as on a full disk)."""
    port = free_port()
    exe = str(Path(sys.executable).parent / "lake")
    proc = subprocess.Popen([exe, "listen", "--port", str(port), "--ae-title", "LAKE",
                             "--host", "127.0.0.1", "--lake", str(lake), "--scheduler",
                             "synchronous", "--batch-seconds", "60"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=None if file_size_limit is None else
                            lambda: resource.setrlimit(resource.RLIMIT_FSIZE,
                                                       (file_size_limit, file_size_limit)))
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("listening as LAKE on 127.0.0.1")
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def stop(proc: subprocess.Popen) -> tuple[int, str, str]:
    """SIGTERM (the last batch is ingested before it exits): exit code, stdout, stderr."""
    os.kill(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err
