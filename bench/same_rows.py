"""Do two versions of the worker code give the same rows? (A check, not a timing.)

``dump`` runs ``etl.extract.extract_batch`` of the code under ``--code`` (a checkout
of this repository; default: this one) over a corpus of files, in batches of 128 as
a worker reads them, for an identified lake, a research lake and a research lake
with a private allow-list, each with both checksum modes, and writes one Arrow IPC
file per case. ``compare`` says, case by case and column by column, where two dumps
differ: every value is compared by its ``repr`` (so 0.0 and -0.0, 1 and 1.0, NaN
and NaN are told apart and matched exactly), quarantine reasons and messages
included; ``dicom_json`` is compared by its parsed value (``repr`` of ``json.loads``,
key order included) and the rows whose text alone differs are counted.

    git archive OLD | tar -x -C /tmp/old
    .venv/bin/python bench/same_rows.py dump --code /tmp/old --out /tmp/rows-old DIR...
    .venv/bin/python bench/same_rows.py dump --out /tmp/rows-new DIR...
    .venv/bin/python bench/same_rows.py compare /tmp/rows-old /tmp/rows-new

The corpus: every file below each DIR (e.g. the bench archives, a generated test
archive, the bad-input corpus of ``tests/etl/corpus.py``) plus pydicom's bundled
files, those of pydicom-data and the character-set files.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

KEY = bytes(range(32))
#: a private allow-list entry (GE's acquisition group, present in pydicom's files)
PRIVATE = {"group": "0x0019", "creator": "GEMS_ACQU_01", "element": "0x1e"}
CASES = [(policy, checksum) for policy in ("identified", "research", "research-private")
         for checksum in ("header", "full")]


def corpus(dirs: list[str]) -> list[str]:
    import pydicom.data
    from pydicom.data import get_charset_files
    from pydicom.data.data_manager import external_data_sources

    roots = [Path(pydicom.data.__file__).parent / "test_files"]
    roots += [Path(src.data_path) for src in external_data_sources().values()
              if hasattr(src, "data_path")]
    files = {p for root in roots if root.is_dir() for p in root.rglob("*") if p.is_file()}
    files |= {Path(f) for f in get_charset_files("*")}
    for d in dirs:
        files |= {p for p in Path(d).rglob("*") if p.is_file() or p.is_symlink()}
    return sorted(str(p) for p in files)


def dump(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(Path(args.code).resolve()))
    import pyarrow as pa

    import etl.extract
    from etl.config import IngestConfig
    from etl.discover import FoundFile
    from lakehouse.deid import Policy, private_tag
    from lakehouse.privacy import Pseudonymizer

    print(f"code: {Path(etl.extract.__file__).resolve().parent.parent}", file=sys.stderr)
    found = []
    for p in corpus(args.dirs):
        try:
            st = os.stat(p)
        except OSError as exc:  # a broken link: an io_error row
            found.append(FoundFile(p, 0, 0, error=str(exc)))
            continue
        found.append(FoundFile(p, st.st_size, st.st_mtime_ns))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, checksum in CASES:
        policy = None if name == "identified" else Policy(
            Pseudonymizer(KEY), [private_tag(PRIVATE)] if name == "research-private" else [])
        config = IngestConfig(checksum=checksum)
        tables = [etl.extract.extract_batch(found[i:i + 128], config, "same-rows", policy)
                  for i in range(0, len(found), 128)]
        table = pa.concat_tables(tables)
        with pa.OSFile(str(out / f"{name}-{checksum}.arrow"), "wb") as sink, \
                pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        counts = {s: table.column("status").to_pylist().count(s)
                  for s in ("ok", "quarantined", "skipped")}
        print(f"{name}-{checksum}: {table.num_rows} rows {counts}", file=sys.stderr)
    return 0


def _read(path: Path):
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_file(source).read_all()


def compare(args: argparse.Namespace) -> int:
    a_dir, b_dir = Path(args.a), Path(args.b)
    failures = 0
    for name, checksum in CASES:
        case = f"{name}-{checksum}"
        a, b = _read(a_dir / f"{case}.arrow"), _read(b_dir / f"{case}.arrow")
        if a.schema != b.schema or a.num_rows != b.num_rows:
            print(f"{case}: schemas or row counts differ ({a.num_rows} / {b.num_rows})")
            failures += 1
            continue
        differ: dict[str, int] = {}
        text_only = 0
        for column in a.column_names:
            va, vb = a.column(column).to_pylist(), b.column(column).to_pylist()
            if column == "dicom_json":
                n = 0
                for x, y in zip(va, vb, strict=True):
                    if x == y:
                        continue
                    if x is None or y is None or repr(json.loads(x)) != repr(json.loads(y)):
                        n += 1
                    else:
                        text_only += 1
            else:
                n = sum(repr(x) != repr(y) for x, y in zip(va, vb, strict=True))
            if n:
                differ[column] = n
        status = a.column("status").to_pylist()
        print(f"{case}: {a.num_rows} rows ({status.count('ok')} ok, "
              f"{status.count('quarantined')} quarantined, {status.count('skipped')} skipped); "
              f"differing values: {differ or 'none'}; dicom_json texts differing with equal "
              f"parsed values: {text_only}")
        failures += bool(differ)
    print("SAME ROWS" if not failures else f"DIFFERENT in {failures} case(s)")
    return 1 if failures else 0


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump", help="rows of every case, one Arrow file each")
    d.add_argument("dirs", nargs="*", help="folders of files to add to the corpus")
    d.add_argument("--code", default=str(Path(__file__).resolve().parent.parent),
                   help="the checkout whose etl/ and lakehouse/ read the files")
    d.add_argument("--out", required=True)
    c = sub.add_parser("compare", help="where two dumps differ")
    c.add_argument("a")
    c.add_argument("b")
    args = ap.parse_args(argv)
    return dump(args) if args.cmd == "dump" else compare(args)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
