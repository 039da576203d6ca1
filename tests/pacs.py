"""A real PACS for the tests and benchmarks: Orthanc (Debian packages `orthanc`,
`orthanc-dicomweb`) started on loopback as an unprivileged user, with a temporary
configuration and storage. Orthanc listens on every interface; we only talk to
127.0.0.1, and `RemoteAccessAllowed` is false."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
AE_TITLE = "ORTHANC"


def orthanc_missing() -> str | None:
    """Why Orthanc cannot run here (None when it can)."""
    if not os.path.exists(ORTHANC) or not os.path.exists(DICOMWEB_PLUGIN):
        return ("Orthanc is not installed: apt-get install -y --no-install-recommends "
                "orthanc orthanc-dicomweb (as .ci/run does)")
    if os.geteuid() != 0 and shutil.which("setpriv") is None:
        return "setpriv is missing"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Orthanc:
    http_port: int
    dicom_port: int
    folder: Path
    process: subprocess.Popen

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def _open(self, req: urllib.request.Request | str, timeout: float):
        return urllib.request.urlopen(req, timeout=timeout)

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def get(self, path: str):
        with self._open(self.url + path, timeout=10) as r:
            return json.loads(r.read())

    def upload(self, data: bytes) -> str | None:
        """POST /instances; Orthanc's id of the instance when it stored it (None: rejected
        or already there)."""
        req = urllib.request.Request(self.url + "/instances", data=data, method="POST",
                                     headers={"Content-Type": "application/dicom"})
        try:
            with self._open(req, timeout=30) as r:
                answer = json.loads(r.read())
        except urllib.error.HTTPError:
            return None
        return answer["ID"] if answer.get("Status") == "Success" else None

    def delete(self, path: str) -> None:
        req = urllib.request.Request(self.url + path, method="DELETE")
        self._open(req, timeout=30).close()

    def upload_folder(self, root: Path) -> int:
        n = 0
        for folder, _dirs, names in sorted(os.walk(root)):
            for name in sorted(names):
                n += self.upload(Path(folder, name).read_bytes()) is not None
        return n

    def post(self, path: str, body) -> object:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     method="POST", headers={"Content-Type": "application/json"})
        with self._open(req, timeout=120) as r:
            return json.loads(r.read() or b"null")

    def put(self, path: str, body) -> None:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     method="PUT", headers={"Content-Type": "application/json"})
        self._open(req, timeout=30).close()

    def find(self, **query: str) -> list[str]:
        """Orthanc ids of the instances matching ``query`` (DICOM keywords)."""
        return self.post("/tools/find", {"Level": "Instance", "Query": query})  # type: ignore

    def instance_uids(self, **query: str) -> set[str]:
        ids = self.find(**query) if query else self.get("/instances")
        return {self.get(f"/instances/{i}/simplified-tags")["SOPInstanceUID"] for i in ids}


@contextlib.contextmanager
def run_orthanc(modalities: dict[str, tuple[str, int]] | None = None,
                tls: Path | None = None) -> Iterator[Orthanc]:
    """Start Orthanc with storage in a new temporary folder (removed afterwards);
    ``modalities``: AE -> (host, port) it may send to (C-MOVE destinations); ``tls``: a
    folder of :func:`tests.tlscerts.make_certs`: its DICOM port then speaks TLS only,
    with the ``server`` certificate, and asks callers for one the ``ca`` signed."""
    # not under pytest's tmp_path: that is owner-only, and Orthanc runs as nobody
    folder = Path(tempfile.mkdtemp(prefix="lake-orthanc-"))
    (folder / "db").mkdir(exist_ok=True)
    (folder / "log").mkdir(exist_ok=True)
    http_port, dicom_port = free_port(), free_port()
    config = {
        "Name": "lake-tests", "StorageDirectory": str(folder / "db"),
        "IndexDirectory": str(folder / "db"), "HttpPort": http_port, "DicomPort": dicom_port,
        "DicomAet": AE_TITLE, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "HttpsVerifyPeers": False, "DicomAlwaysAllowEcho": True, "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowFind": True, "DicomAlwaysAllowGet": True,
        "DicomAlwaysAllowMove": True, "DicomCheckCalledAet": False,
        "DicomModalities": {ae: [ae, host, port] for ae, (host, port) in
                            (modalities or {}).items()},
        "Plugins": [DICOMWEB_PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    if tls is not None:
        for name in ("server.pem", "server.key", "ca.pem"):
            shutil.copy(tls / name, folder / name)
        # (not HTTPS too: this Orthanc, 1.10.1 on Debian, exits at its first HTTPS request)
        config.update({"DicomTlsEnabled": True,
                       "DicomTlsCertificate": str(folder / "server.pem"),
                       "DicomTlsPrivateKey": str(folder / "server.key"),
                       "DicomTlsTrustedCertificates": str(folder / "ca.pem"),
                       "DicomTlsRemoteCertificateRequired": True})
    cfg = folder / "orthanc.json"
    cfg.write_text(json.dumps(config))
    cmd = [ORTHANC, str(cfg), f"--logdir={folder / 'log'}"]
    if os.geteuid() == 0:  # never run a network server as root
        for p in [folder, *folder.rglob("*")]:
            os.chown(p, 65534, 65534)
        cmd = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *cmd]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    server = Orthanc(http_port, dicom_port, folder, proc)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                server.get("/system")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"Orthanc did not start; see {folder / 'log'}") from None
                time.sleep(0.1)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(folder, ignore_errors=True)
