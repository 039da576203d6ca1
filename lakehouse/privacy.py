"""Keys and keyed pseudonyms: the cryptographic half of the privacy model.

A research lake has a secret 256-bit key that never enters the lake folder.
From it, HMAC-SHA256 derives everything that must be consistent across runs,
files and workers but impossible to recompute without the key:

- pseudonyms for identifiers (PatientID, AccessionNumber, StudyID);
- ``2.25.`` UIDs replacing every instance/series/study/frame-of-reference UID
  (and UIDs referenced inside sequences), so references still resolve;
- a per-patient date offset (a whole number of weeks, so weekdays and
  intervals within a patient are exact; different patients differ).

The lake stores only a fingerprint of the key, to refuse a wrong key.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lakehouse.errors import LakeError

KEY_BYTES = 32
#: Date offsets are -7 * (1 .. MAX_WEEKS) days: up to about five years back.
MAX_WEEKS = 260


class KeyError_(LakeError):
    def __init__(self, path: Path | str | None, detail: str):
        self.path = str(path) if path else None
        self.detail = detail
        super().__init__(detail)


def default_key_path(lake_id: str) -> Path:
    """Where ``lake init`` puts a new key unless told otherwise (outside any lake)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "imaging-lakehouse" / "keys" / f"{lake_id}.key"


def create_key_file(path: Path) -> bytes:
    """A new random key in ``path`` (hex, owner-only permissions). Never overwrites."""
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(KEY_BYTES)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key.hex() + "\n")
    return key


def read_key_file(path: Path) -> bytes:
    try:
        st = path.stat()
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise KeyError_(path, f"key file {path} not found: pass --key-file or set "
                              "LAKE_KEY_FILE to the key created by `lake init`") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyError_(path, f"cannot read key file {path}: {exc}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyError_(path, f"key file {path} is readable by others; "
                              f"run `chmod 600 {path}` first")
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise KeyError_(path, f"key file {path} does not hold a hex key") from None
    if len(key) != KEY_BYTES:
        raise KeyError_(path, f"key file {path} holds {len(key)} bytes, expected {KEY_BYTES}")
    return key


def fingerprint(key: bytes) -> str:
    """A public fingerprint of the key (HMAC of a constant; reveals nothing of the key)."""
    return hmac.new(key, b"imaging-lakehouse key fingerprint v1", hashlib.sha256).hexdigest()[:32]


@functools.lru_cache(maxsize=8)
def _pads(key: bytes) -> tuple[Any, Any]:
    """SHA-256 states after the HMAC key's inner and outer pads (RFC 2104)."""
    if len(key) > _BLOCK:
        key = hashlib.sha256(key).digest()
    key = key.ljust(_BLOCK, b"\0")
    return hashlib.sha256(key.translate(_IPAD)), hashlib.sha256(key.translate(_OPAD))


def _hmac_sha256(key: bytes, message: bytes) -> bytes:
    """``hmac.digest(key, message, "sha256")``, continued from the key's padded states:
    a few pseudonyms per file, and the one-shot function sets the key up each time
    (1.6 against 3.6 us per MAC here)."""
    inner, outer = _pads(key)
    h = inner.copy()
    h.update(message)
    o = outer.copy()
    o.update(h.digest())
    return o.digest()


_BLOCK = 64  # SHA-256's block size
_IPAD = bytes(x ^ 0x36 for x in range(256))
_OPAD = bytes(x ^ 0x5C for x in range(256))


@dataclass(frozen=True)
class Pseudonymizer:
    """Keyed, deterministic pseudonyms. Picklable (crosses Dask workers)."""

    key: bytes

    def _mac(self, domain: str, value: str) -> bytes:
        return _hmac_sha256(self.key, f"{domain}\x1f{value}".encode())

    def identifier(self, kind: str, value: str) -> str:
        """16 upper-case hex digits (fits SH, the shortest identifier VR)."""
        return self._mac(kind, value).hex()[:16].upper()

    def patient_id(self, patient_id: str, issuer: str | None = None) -> str:
        return self.identifier("PatientID", f"{issuer or ''}\x1e{patient_id}")

    def uid(self, uid: str) -> str:
        """A ``2.25.`` UID (PS3.5 B.2) from the first 128 bits of the keyed MAC."""
        return "2.25." + str(int.from_bytes(self._mac("UID", uid)[:16], "big"))

    def file_digest(self, sha256_hex: str) -> str:
        """The keyed form of a file checksum, for research tables: a plain SHA-256 of a
        file would let anyone holding the original file find its row."""
        return _hmac_sha256(self.key, f"file-sha256\x1f{sha256_hex}".encode()).hex()

    def date_offset_days(self, patient_key: str) -> int:
        """Whole weeks back, 1 to MAX_WEEKS, the same for every date of one patient."""
        n = int.from_bytes(self._mac("date-offset", patient_key)[:8], "big")
        return -7 * (1 + n % MAX_WEEKS)
