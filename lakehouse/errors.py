"""One exception base for the lake; subclasses carry the data a caller needs.

Every error pickles (it may cross a Dask worker boundary) and its message says
what to do next, so the CLI can print it as a single line.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path


class LakeError(Exception):
    """Base class of every error raised by the project's packages."""

    def __reduce__(self):  # keep subclasses with keyword-only fields picklable
        return (_rebuild, (type(self), self.__dict__.copy(), self.args))


def _rebuild(cls, state, args):
    err = cls.__new__(cls)
    Exception.__init__(err, *args)
    err.__dict__.update(state)
    return err


class NoLakeError(LakeError):
    def __init__(self, path: Path | str):
        self.path = str(path)
        super().__init__(
            f"no lake at {self.path}: create one with `lake init {self.path}` "
            "or point --lake / LAKE_DIR at an existing lake"
        )


class LakeExistsError(LakeError):
    def __init__(self, path: Path | str):
        self.path = str(path)
        super().__init__(f"a lake already exists at {self.path}; choose another folder")


class FolderNotEmptyError(LakeError):
    def __init__(self, path: Path | str):
        self.path = str(path)
        super().__init__(f"{self.path} is not empty and holds no lake; a new lake needs a "
                         "new or empty folder")


class LakeFormatError(LakeError):
    def __init__(self, path: Path | str, detail: str):
        self.path = str(path)
        self.detail = detail
        super().__init__(f"the lake at {self.path} is not readable: {detail}")


class UnknownTableError(LakeError):
    def __init__(self, name: str, known: list[str]):
        self.name = name
        self.known = known
        super().__init__(f"unknown table {name!r}; tables are: {', '.join(known)}")


class LakeAccessError(LakeError):
    """The operating system refuses this user the lake (permissions)."""

    def __init__(self, path: Path | str, access: str, detail: str):
        self.path = str(path)
        self.access = access  # "read" or "write"
        self.detail = detail
        needs = ("read access to the lake folder (its _lake/ and research/ folders; the "
                 "audit log in vault/ must be writable)" if access == "read" else
                 "write access to the lake folder (ingest, cohorts, vacuum write to it)")
        super().__init__(f"cannot {access} the lake at {self.path}: {detail}; this needs "
                         f"{needs}: ask the lake's owner, or use another lake")


class LakeBusyError(LakeError):
    def __init__(self, path: Path | str):
        self.path = str(path)
        super().__init__(
            f"another process is writing to the lake at {self.path}; "
            "wait for it to finish (readers are not blocked)"
        )


class SnapshotNotFoundError(LakeError):
    def __init__(self, snapshot: int, latest: int, kept: int | None = None):
        self.snapshot = snapshot
        self.latest = latest
        if kept is not None and 0 <= snapshot < latest:
            super().__init__(f"snapshot {snapshot} is no longer kept (`lake vacuum "
                             f"--expire-days` expired it); {kept} snapshots are kept, the "
                             f"latest is {latest}")
        else:
            super().__init__(f"snapshot {snapshot} does not exist; the latest is {latest}")


_QUOTED = re.compile(r"'([^'\n]*)'|\"([^\"\n]*)\"")
_NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?|[-+]?(inf|nan)", re.IGNORECASE)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
#: where a Rust backtrace starts in a deltalake message (nothing after it is for users)
_BACKTRACE = re.compile(r"^(stack backtrace:?|\d+: )", re.IGNORECASE)
#: what a message of a failed exchange with storage says (network, HTTP, object store)
_STORAGE_FAULT = re.compile(
    r"Generic S3 error|Error interacting with object store|HTTP error|error sending request|"
    r"body error|Content-Length|end of file before message length|timed out|"
    r"Connection (reset|refused|aborted|closed)|FlexibleChecksumError|"
    r"invalid list response|ServiceUnavailable|SlowDown|InternalError", re.IGNORECASE)


def one_line(text: str, limit: int = 400) -> str:
    """A library's message as one line. deltalake (object_store) writes a chain of causes
    on several lines, coloured with terminal escapes, sometimes with a backtrace: kept are
    the first two lines and the last before any backtrace (the root cause), joined by
    ': '. A Python traceback quoted in a message (DuckDB's, of an exception raised in a
    file system it called) gives its last line, the exception."""
    text = _ANSI.sub("", text)
    if "Traceback (most recent call last)" in text:
        tail = [ln.strip() for ln in text.splitlines() if ln.strip()]
        text = tail[-1] if tail else text
    lines = []
    for raw in text.splitlines():
        line = raw.strip().lstrip("↳").strip(" :")
        if _BACKTRACE.match(line):
            break
        if line:
            lines.append(line)
    if len(lines) > 3:
        lines = [lines[0], lines[1], "…", lines[-1]]
    out = ": ".join(lines).replace(": …: ", " … ")
    return out if len(out) <= limit else out[:limit - 1] + "…"


def storage_fault(text: str) -> bool:
    """Does a message say that an exchange with the lake's storage failed (the network,
    HTTP, an object store's answer), rather than that something is damaged?"""
    return bool(_STORAGE_FAULT.search(text))


def error_text(exc: BaseException) -> str:
    """``"<type>: <message>"`` of an exception raised while reading a source file, for a
    failure row: with the values it quotes left out.

    A reader's error often quotes the value it could not use (``could not convert string
    to float: '...'``), and in a damaged file a value can run on over the elements after
    it, names and identifiers included; failure rows are research tables. A quoted
    span stays when it is a number, a DICOM keyword or attribute name, or the type in
    ``'X' object has no attribute``; any other becomes ``'…'``. Control characters
    become ``?``.
    """
    from pydicom.datadict import keyword_dict

    names = _attribute_names()

    def keep(m: re.Match) -> str:
        text = m.group(1) if m.group(1) is not None else m.group(2)
        typename = m.string.startswith(" object", m.end()) and text.isidentifier()
        if typename or _NUMBER.fullmatch(text) or text in keyword_dict or text in names:
            return m.group(0)
        return "'…'"

    message = _QUOTED.sub(keep, str(exc))
    message = "".join(c if c.isprintable() else "?" for c in message)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


@functools.cache
def _attribute_names() -> frozenset[str]:
    from pydicom.datadict import DicomDictionary

    return frozenset(entry[2] for entry in DicomDictionary.values())
