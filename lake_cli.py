"""The ``lake`` command: a thin shell over lakehouse, etl and catalog.

Each subcommand parses its options, calls the packages and prints. Errors of
the project (``LakeError``) and CLI mistakes print one line and exit non-zero.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import decimal
import errno
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

DEFAULT_LAKE = "lake"
EXIT_ERROR = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, says what to do
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


class CliError(Exception):
    """A mistake in how the command was called; printed as one line."""


def _lake_dir(args):
    """The lake named by --lake, $LAKE_DIR or ./lake: a folder (Path), or a Storage for
    ``s3://bucket/prefix``."""
    return _location(args.lake or os.environ.get("LAKE_DIR") or DEFAULT_LAKE, args)


def _location(value: str, args):
    """A folder as a Path; an object-store URL as a Storage with the storage options of
    ``--storage-options FILE`` or ``$LAKE_STORAGE_OPTIONS`` (fsspec/s3fs options as JSON;
    without a file, s3fs and deltalake read AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)."""
    from lakehouse.storage import is_object_url, load_options, open_storage

    if not is_object_url(value):
        return Path(value)
    options = load_options(getattr(args, "storage_options", None)
                           or os.environ.get("LAKE_STORAGE_OPTIONS"))
    return open_storage(value, options)


def _shown(location) -> str:
    """A lake location as printed: a folder's absolute path, or its URL."""
    return str(location.absolute()) if isinstance(location, Path) else str(location)


# --- features -----------------------------------------------------------------

def cmd_features(args) -> int:
    from etl.features import FeaturesConfig, compute_features
    from etl.radiomics import Params
    from lakehouse import Lake

    lake = Lake.open(_lake_dir(args))
    params = Params.load(args.params) if args.params else Params.default()
    mask_files = []
    for spec in args.mask_file or []:
        uid, sep, path = spec.partition("=")
        if not sep or not uid or not path:
            raise CliError(f"--mask-file expects SERIES_UID=PATH, got {spec!r}")
        if not Path(path).is_file():
            raise CliError(f"mask file {path} does not exist")
        mask_files.append((uid, path))
    series = tuple(args.series or ())
    if args.cohort:
        series = _cohort_series(lake, args.cohort)
        if not series:
            raise CliError(f"cohort {args.cohort!r} has no series")
    config = FeaturesConfig(series=series, params=params, mask_files=tuple(mask_files),
                            scheduler=args.scheduler or "processes", workers=args.workers,
                            image_series_only=bool(args.cohort))
    s = compute_features(lake, config)
    print(f"features run {s.run_id}: {s.series} series ({s.volumes_ok} regular volumes, "
          f"{s.image_stats} with image statistics), {s.masks} masks, {s.segments} segments "
          f"({s.segment_tasks} tasks, {s.volume_loads} volume reads), "
          f"{s.feature_rows} feature values, {s.failures} failures in {s.seconds:.1f} s; "
          f"snapshot {s.snapshot}")
    for reason, n in sorted(s.failure_reasons.items()):
        print(f"  {reason}: {n}")
    return 0


def _cohort_series(lake, name: str) -> tuple[str, ...]:
    """The series of a saved cohort (a study cohort gives all series of its studies, as
    the lake held them at the cohort's snapshot)."""
    from catalog import cohorts
    from catalog.connect import Catalog

    result = cohorts.open_cohort(lake, name).result()
    if result.key == "SeriesInstanceUID":
        return tuple(result.members)
    with Catalog(lake, result.snapshot) as cat:
        rows = cat.arrow("SELECT SeriesInstanceUID FROM series "
                         "WHERE list_contains($s, StudyInstanceUID) ORDER BY 1",
                         {"s": list(result.members)})
    return tuple(rows.column(0).to_pylist())


# --- init ---------------------------------------------------------------------

def _key_file(args) -> Path | None:
    value = getattr(args, "key_file", None) or os.environ.get("LAKE_KEY_FILE")
    return Path(value) if value else None


def cmd_init(args) -> int:
    from lakehouse import Lake

    path = _location(args.path, args) if args.path else _lake_dir(args)
    if isinstance(path, Path):
        _check_new_lake_folder(path)
    private = []
    for spec in args.private_tag or []:
        parts = [p.strip() for p in spec.split(",")]
        if len(parts) != 3:
            raise CliError(f"--private-tag {spec!r}: expected GROUP,CREATOR,ELEMENT "
                           "(e.g. 0x0019,GEMS_ACQU_01,0x23)")
        private.append({"group": parts[0], "creator": parts[1], "element": parts[2]})
    if args.profile != "research" and getattr(args, "key_file", None):
        raise CliError(f"--key-file is for research lakes: an {args.profile} lake keeps "
                       "identifiers as found and uses no key; leave --key-file out")
    key_file = _key_file(args) if args.profile == "research" else None
    try:
        lake = Lake.create(path, profile=args.profile, key_file=key_file,
                           private_allowlist=private, checksum=args.checksum)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    print(f"created {lake.profile} lake at {lake.location}")
    if lake.research:
        key = key_file or lake.default_key_path()
        print(f"pseudonymization key: {key} (owner-only; keep it safe and out of the lake: "
              "without it nothing more can be ingested, with it pseudonyms can be recomputed)")
    else:
        print("identified profile: the tables will hold names and identifiers as found")
    print(f"next: lake ingest /path/to/dicom --lake {lake.location}")
    return 0


def _check_new_lake_folder(path: Path) -> None:
    """`lake init` needs a new or empty folder: say which it is not (a lake, a file,
    another folder's contents) before anything is written."""
    from lakehouse import layout

    if layout.manifest_path(path).exists():
        return  # Lake.create says a lake is there
    if path.exists() and not path.is_dir():
        raise CliError(f"{path} is a file, not a folder: give a new or empty folder for the "
                       "lake")
    if path.is_dir() and any(path.iterdir()):
        raise CliError(f"the folder {path} is not empty (and holds no lake): give a new or "
                       "empty folder for the lake")


# --- ingest -------------------------------------------------------------------

def _start_workers(scheduler: str) -> None:
    """Start the ingest workers' fork server before this process imports the rest: the
    server's imports of the worker code (about a second) then run beside this process's
    own, instead of after them while the first files wait (``etl.workerserver``)."""
    from etl.workerserver import start

    start(scheduler)


def cmd_ingest(args) -> int:
    scheduler = args.scheduler or ("local-cluster" if args.workers else "processes")
    _start_workers(scheduler)
    from etl.leaveout import INGEST_LEFT_OUT, leave_out, one_blas_thread

    if args.own_process:  # numpy's BLAS threads: nothing for them to do in this process
        one_blas_thread()
    # in a process of its own only (a program that called main() goes on after it), and
    # for a folder (a PACS or object store source brings its client libraries)
    alone = args.own_process and "://" not in args.source
    restore = leave_out(INGEST_LEFT_OUT) if alone else (lambda: None)
    try:
        return _ingest(args, scheduler)
    finally:
        restore()


def _ingest(args, scheduler: str) -> int:
    from etl import IngestConfig, ingest
    from etl.sources import ingest_remote, load_storage_options, parse_filters, resolve
    from lakehouse import Lake

    lake = Lake.open(_lake_dir(args))
    config = IngestConfig(workers=args.workers, scheduler=scheduler,
                          batch_files=args.batch_files, scheduler_timeout=args.scheduler_timeout,
                          reuse_listings=not args.relist, compact_files=args.compact_files)
    show = args.progress and sys.stderr.isatty()
    bar = None
    bar_stage = ""

    def progress(stage: str, done: int, total: int) -> None:
        nonlocal bar, bar_stage
        if not show:
            return
        from tqdm import tqdm

        if bar is not None and stage != bar_stage:  # fetch (PACS sources), then extract
            bar.close()
            bar = None
        if bar is None:
            bar_stage = stage
            bar = tqdm(total=total, unit="file", desc="fetch" if stage == "fetch" else "ingest",
                       file=sys.stderr)
        bar.total = total or None  # the total grows while the source is still being walked
        bar.n = done
        bar.refresh()

    def close_bar() -> None:
        if bar is not None:
            bar.close()

    options = load_storage_options(args.storage_options or os.environ.get("LAKE_STORAGE_OPTIONS"))
    source = resolve(args.source, parse_filters(args.filter, args.since), options,
                     _tls_client(args))
    if not isinstance(source, Path):
        return _ingest_remote(args, lake, source, config, progress, ingest_remote, close_bar)
    try:
        summary = ingest(lake, source, config, progress if show else None,
                         key_file=_key_file(args))
    finally:
        close_bar()
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2))
    else:
        _print_run(summary)
    return 0


def _ingest_remote(args, lake, source, config, progress, ingest_remote, close_bar) -> int:
    # client libraries log request URLs, which carry original UIDs: not on the console.
    # urllib3 warns on every retried connection with the URL path (studies/UID/series/UID/
    # instances/UID); pynetdicom logs failed associations as errors: the run's error line
    # says what happened, once (-vv shows pynetdicom's own lines)
    for name in ("dicomweb_client", "pynetdicom"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    if args.verbose < 2:
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    try:
        pulled = ingest_remote(lake, source, config, progress, key_file=_key_file(args))
    finally:
        close_bar()
    if args.json:
        print(json.dumps(pulled.to_dict(), indent=2))
        return 0
    print(f"{source.kind} {source.key}: {pulled.listed} listed, {pulled.already_fetched} "
          f"fetched before, {pulled.fetched} fetched now in {pulled.fetch_seconds:.1f} s")
    if pulled.failed:
        print(f"  warning: {pulled.failed} could not be fetched; the next run retries "
              f"them (listed in {pulled.state_file})")
    if pulled.kept_in_staging:
        print(f"  {pulled.kept_in_staging} fetched files not ingested (quarantined, conflict or "
              f"skipped) are kept in {pulled.staging}")
    _print_run(pulled.run)
    return 0


def _print_run(s) -> None:
    o = s.outcomes
    print(f"run {s.run_id}: {s.files_seen} files seen in {s.seconds:.1f} s "
          f"({s.scheduler or 'nothing to read'}{f', {s.workers} workers' if s.workers else ''})")
    print(f"  unchanged {s.files_unchanged}, ingested {o['ingested']}, duplicate "
          f"{o['duplicate']}, conflict {o['conflict']}, skipped {o['skipped']}, "
          f"quarantined {o['quarantined']}")
    for reason, n in sorted(s.quarantine_reasons.items()):
        print(f"  quarantined {reason}: {n}")
    for reason, n in sorted(s.skipped_reasons.items()):
        print(f"  skipped {reason}: {n}")
    if s.folders_unreadable:
        print(f"  warning: {s.folders_unreadable} folders could not be listed")
    if s.summaries == "updated":
        rows = ", ".join(f"{t} {n}" for t, n in s.summary_rows.items())
        print(f"  summaries updated: rows written to {rows}")
    elif s.summaries == "rebuilt":
        print("  summaries rebuilt")
    if s.compacted:
        print("  compacted: " + ", ".join(f"{t} {a} small files into {b}"
                                          for t, (a, b) in s.compacted.items()))
    print(f"  lake snapshot {s.snapshot}")


# --- listen -------------------------------------------------------------------

def cmd_listen(args) -> int:
    import signal
    import threading

    from etl import IngestConfig
    from etl.sources.listen import Listener
    from lakehouse import Lake

    lake = Lake.open(_lake_dir(args))
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # it logs UIDs at INFO
    config = IngestConfig(scheduler=args.scheduler or "processes", workers=args.workers,
                          scheduler_timeout=args.scheduler_timeout,
                          compact_files=args.compact_files)

    def report(run) -> None:
        o = run.outcomes
        print(f"batch {run.run_id}: {run.files_seen} received files, ingested {o['ingested']}, "
              f"duplicate {o['duplicate']}, conflict {o['conflict']}, "
              f"quarantined {o['quarantined']}, skipped {o['skipped']}", flush=True)

    listener = Listener(lake, args.ae_title, args.port, host=args.host, config=config,
                        key_file=_key_file(args), batch_seconds=args.batch_seconds,
                        batch_files=args.batch_files, allow=args.allow, tls=_tls(args),
                        allow_certs=args.allow_cert, on_batch=report)
    stop = threading.Event()

    def on_signal(signum, frame) -> None:
        stop.set()
        listener.wake()

    try:
        listener.start()
    except OSError as exc:
        raise CliError(f"cannot listen on {args.host}:{args.port}: "
                       f"{exc.strerror or exc}") from None
    tls = "" if not args.tls_cert else \
        " (TLS, senders must present a certificate)" if args.tls_ca else " (TLS)"
    allowed = f", from {len(args.allow)} allowed senders" if args.allow else ""
    if args.allow_cert:
        allowed += f", with {len(args.allow_cert)} allowed certificate names"
        titled = sum(a.title is not None for a in args.allow_cert)
        allowed += f" ({titled} for an AE title only)" if titled else ""
    print(f"listening as {args.ae_title} on {args.host}:{args.port}{tls}, ingesting every "
          f"{args.batch_seconds:g} s or {args.batch_files} instances{allowed}; "
          "Ctrl-C to stop", flush=True)
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        stats = listener.run(stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(f"stopped: {stats.received} instances received, {stats.refused} refused "
          f"(not stored; the senders keep them), {stats.associations} associations, "
          f"{stats.associations_rejected} rejected, {stats.associations_aborted} aborted"
          + (f", {stats.tls_failed} failed the TLS handshake" if stats.tls_failed else "")
          + (f", {stats.certificates_refused} refused for their certificate's names "
             "(--allow-cert)" if stats.certificates_refused else "")
          + (f", {stats.connections_refused} connections refused (--allow, or too many "
             "not yet associations)" if stats.connections_refused else "")
          + f"; "
          f"{stats.batches} batches, ingested {stats.ingested}, duplicate {stats.duplicate}, "
          f"quarantined {stats.quarantined}, kept in staging {stats.kept_in_staging}"
          + (f"; {stats.failed_batches} batches failed and were tried again"
             if stats.failed_batches else ""),
          flush=True)
    if stats.not_ingested:
        print(f"{stats.not_ingested} received files are not ingested yet (the last batch "
              "failed: see the error above); they are kept, and the next `lake listen` on "
              "this lake ingests them first", flush=True)
    return 0


# --- sql ----------------------------------------------------------------------

def cmd_sql(args) -> int:
    from catalog import open_lake
    from lakehouse import audit

    query = sys.stdin.read() if args.query == "-" else args.query
    if not query.strip():
        raise CliError("the query is empty: give a SQL statement, e.g. "
                       '"SELECT Modality, count(*) AS n FROM studies GROUP BY 1" '
                       "(or - to read it from stdin)")
    with open_lake(_lake_dir(args), args.snapshot) as cat:
        table = cat.arrow(query)
        audit.record(cat.lake, "sql", text=query, snapshot=cat.snapshot.number,
                     rows=table.num_rows)
        if cat.lake.profile == "identified":
            print("# identified lake: this result may contain patient identifiers",
                  file=sys.stderr)
    rows = table.to_pylist()
    cols = table.column_names
    out = sys.stdout
    if args.format == "json":
        _json_rows(rows, out)
    elif args.format == "csv":
        w = csv.writer(out, lineterminator="\n")
        w.writerow(cols)
        for r in rows:
            w.writerow([_plain(r[c]) for c in cols])
    else:
        _print_table(cols, rows, out)
    return 0


def _json_default(v):
    if isinstance(v, dt.date | dt.time | dt.datetime):
        return v.isoformat()
    if isinstance(v, decimal.Decimal):
        return _decimal(v)
    if isinstance(v, bytes):
        return v.hex()
    if _is_interval(v):
        return _iso_duration(v)
    return str(v)


def _json_rows(rows: list[dict], out) -> None:
    """One JSON array of row objects: strict JSON (NaN and infinities become null, which
    JSON has no other way to say), dates and times as ISO strings."""
    json.dump([{k: _json_value(v) for k, v in r.items()} for r in rows], out,
              default=_json_default, ensure_ascii=False, allow_nan=False)
    out.write("\n")


def _json_value(v):
    if _is_interval(v):
        return _iso_duration(v)
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, decimal.Decimal):
        return _decimal(v)
    if isinstance(v, dict):
        return {k: _json_value(x) for k, x in v.items()}
    if isinstance(v, list) or (isinstance(v, tuple) and not _is_interval(v)):
        return [_json_value(x) for x in v]
    return v


def _decimal(v: decimal.Decimal) -> int | float | None:
    """A DECIMAL (DuckDB's sum() of integers is a HUGEINT, i.e. DECIMAL(38,0)) as a JSON
    number: an integer when it has no fractional part."""
    if not v.is_finite():
        return None
    return int(v) if v == v.to_integral_value() else float(v)


def _is_interval(v) -> bool:
    return type(v).__name__ == "MonthDayNano" and len(v) == 3


def _iso_duration(v) -> str:
    """A DuckDB INTERVAL (Arrow month_day_nano) as an ISO 8601 duration, e.g. P1M3DT1.5S."""
    months, days, nanos = v
    seconds = decimal.Decimal(nanos) / 1_000_000_000
    text = "P" + (f"{months}M" if months else "") + (f"{days}D" if days else "")
    if nanos or text == "P":
        text += f"T{seconds.normalize():f}S"
    return text


def _plain(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):  # as SQL and JSON write them (DuckDB's own CSV too)
        return "true" if v else "false"
    if _is_interval(v):
        return _iso_duration(v)
    if isinstance(v, list | dict | tuple):
        return json.dumps(_json_value(v), default=_json_default, ensure_ascii=False)
    if isinstance(v, dt.date | dt.time | dt.datetime):
        return v.isoformat()
    if isinstance(v, bytes):
        return v.hex()
    return str(v)


def _width(text: str) -> int:
    """Columns a string takes in a terminal: East Asian wide and full-width characters
    take two, combining marks none."""
    return sum(0 if unicodedata.combining(ch) else
               2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def _clip(text: str, max_width: int) -> str:
    if _width(text) <= max_width:
        return text
    out, used = [], 0
    for ch in text:
        w = _width(ch)
        if used + w > max_width - 1:
            break
        out.append(ch)
        used += w
    return "".join(out) + "…"


def _pad(text: str, width: int) -> str:
    return text + " " * (width - _width(text))


def _print_table(cols: list[str], rows: list[dict], out, max_width: int = 60) -> None:
    cells = [[_clip(_plain(r[c]), max_width) for c in cols] for r in rows]
    widths = [max([_width(c)] + [_width(row[i]) for row in cells]) for i, c in enumerate(cols)]
    out.write("  ".join(_pad(c, w) for c, w in zip(cols, widths, strict=True)).rstrip() + "\n")
    out.write("  ".join("-" * w for w in widths) + "\n")
    for row in cells:
        out.write("  ".join(_pad(v, w) for v, w in zip(row, widths, strict=True)).rstrip()
                  + "\n")
    out.write(f"({len(rows)} row{'s' if len(rows) != 1 else ''})\n")


# --- report -------------------------------------------------------------------

def cmd_report(args) -> int:
    from catalog import open_lake, reports

    definition = reports.RepeatDefinition(
        window_days=args.window,
        match=tuple(_names(args.match)) if args.match else reports.DEFAULT_REPEATS.match,
        exclude_localizers=not args.keep_localizers,
        exclude_derived=not args.keep_derived,
        exclude_secondary=not args.keep_secondary,
    )
    request = reports.ReportRequest(
        kind=args.kind, by=tuple(_names(args.by)), date_from=args.date_from,
        date_to=args.date_to, studies=args.studies, repeats=definition, drl=args.drl,
        exceedances=args.exceedances,
        where=tuple(reports.Filter.parse(w) for w in args.where or ()))
    with open_lake(_lake_dir(args), args.snapshot) as cat:
        table = reports.run(cat, request)
        if cat.lake.profile == "identified" and args.format != "json" and args.studies:
            print("# identified lake: results may contain patient identifiers", file=sys.stderr)
        by = set(request.by or reports.DEFAULT_BY[args.kind])
        if cat.lake.research and (args.date_from or args.date_to or by & _CALENDAR):
            print("# research lake: each patient's dates are shifted by 1 to 260 weeks, so "
                  "--from/--to and day/week/month/year groups use shifted dates (intervals, "
                  "weekdays and hours are exact); calendar trends need an identified lake",
                  file=sys.stderr)
    rows = table.to_pylist()
    cols = table.column_names
    if args.format == "json":
        _json_rows(rows, sys.stdout)
    elif args.format == "csv":
        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(cols)
        for r in rows:
            w.writerow([_plain(_rounded(r[c])) for c in cols])
    else:
        _print_table(cols, [{c: _rounded(r[c], 4) for c in cols} for r in rows], sys.stdout)
    return 0


#: report columns that place a study in calendar time (shifted per patient in research lakes)
_CALENDAR = {"day", "week", "month", "year", "StudyDate"}


def _names(text: str | None) -> list[str]:
    return [n.strip() for n in (text or "").split(",") if n.strip()]


def _rounded(v, digits: int = 6):
    return round(v, digits) if isinstance(v, float) else v


# --- status -------------------------------------------------------------------

def cmd_status(args) -> int:
    from catalog import open_lake

    with open_lake(_lake_dir(args)) as cat:
        kept = cat.kept_snapshots  # the folder listed once (thousands, fed by a listener)
        status = {
            "lake": str(cat.lake.root.absolute()) if cat.lake.local else cat.lake.location,
            "profile": cat.lake.profile,
            "key_fingerprint": cat.lake.config.key_fingerprint,
            "snapshot": cat.snapshot.number,
            "snapshot_created_at": cat.snapshot.created_at,
            # each keeps its files: `lake vacuum --expire-days` forgets old ones
            "snapshots_kept": len(kept),
            "oldest_snapshot_created_at": cat.lake.snapshot(kept[0], numbers=kept).created_at,
            "tables": cat.counts(),
            "table_files": dict(cat.data_files),
            "quarantine_by_reason": dict(cat.con.execute(
                "SELECT reason, count(*) FROM quarantine GROUP BY 1 ORDER BY 1").fetchall()),
            "last_runs": cat.arrow(
                "SELECT ingest_run_id, status, files_seen, files_unchanged, files_ingested, "
                "files_duplicate, files_conflict, files_skipped, files_quarantined, "
                "round(total_seconds, 2) AS seconds, message FROM ingest_runs "
                "ORDER BY started_at DESC LIMIT 5").to_pylist(),
        }
    if args.json:
        print(json.dumps(status, indent=2, default=_json_default))
        return 0
    print(f"lake      {status['lake']}")
    warn = ("  (identified: contains patient identifiers)" if status["profile"] == "identified"
            else f"  (pseudonymized; key fingerprint {status['key_fingerprint']})")
    print(f"profile   {status['profile']}{warn}")
    print(f"snapshot  {status['snapshot']} ({status['snapshot_created_at']}); "
          f"{status['snapshots_kept']:,} kept since {status['oldest_snapshot_created_at']}")
    print(f"tables {'rows':>26} {'files':>7}")
    for name, n in status["tables"].items():
        print(f"  {name:<20} {n:>10,} {status['table_files'].get(name, 0):>7,}")
    if status["quarantine_by_reason"]:
        print("quarantined files by reason")
        for reason, n in status["quarantine_by_reason"].items():
            print(f"  {reason:<32} {n:>6,}")
    if status["last_runs"]:
        print("last runs")
        for r in status["last_runs"]:
            print(f"  {r['ingest_run_id']}  {r['status']:<9} seen {r['files_seen']}, "
                  f"unchanged {r['files_unchanged']}, ingested {r['files_ingested']}, "
                  f"quarantined {r['files_quarantined']}  ({r['seconds']} s)")
            if r["status"] != "completed" and r["message"]:
                print(f"    {r['message']}")
    return 0


# --- cohort -------------------------------------------------------------------

def cmd_cohort(args) -> int:
    from catalog import cohorts

    lake = _lake_dir(args)
    action = args.cohort_command
    if action == "save":
        if (args.sql is None) == (args.spec is None):
            raise CliError("give the cohort as --sql QUERY or --spec FILE (exactly one)")
        from catalog import spec as specs

        query = sys.stdin.read() if args.sql == "-" else args.sql
        definition = specs.load(args.spec) if args.spec else None
        saved = cohorts.save(lake, args.name, sql=query, spec=definition,
                             description=args.description or "", replace=args.replace,
                             snapshot=args.snapshot)
        print(f"saved cohort {saved.name}: {saved.row_count} {saved.grain} rows at lake "
              f"snapshot {saved.snapshot} (sha256 {saved.rows_sha256[:12]})")
        return 0
    if action == "list":
        rows = [cohorts.load(lake, n) for n in cohorts.names(lake)]
        if args.json:
            print(json.dumps([r.to_dict() for r in rows], indent=2))
        else:
            _print_table(["name", "grain", "rows", "snapshot", "kind", "created_at"],
                         [{"name": r.name, "grain": r.grain, "rows": r.row_count,
                           "snapshot": r.snapshot, "kind": r.definition.kind,
                           "created_at": r.created_at} for r in rows], sys.stdout)
        return 0
    if action == "show":
        cohort = cohorts.open_cohort(lake, args.name)
        drift = cohort.drift()
        info = {**cohort.saved.to_dict(), "reproduced": True, "latest": drift.to_dict()}
        if args.json:
            print(json.dumps(info, indent=2, default=_json_default))
            return 0
        s = cohort.saved
        print(f"cohort    {s.name} ({s.definition.kind}, one row per {s.grain})")
        print(f"snapshot  {s.snapshot}: {s.row_count} rows, sha256 {s.rows_sha256} "
              "(reproduced)")
        print(f"definition\n  {s.definition.sql or json.dumps(s.definition.spec)}")
        print(f"latest    {drift.b}: " + ("same result" if drift.same else
              f"+{len(drift.added)} -{len(drift.removed)} {s.grain} rows"
              f"{', rows changed' if drift.rows_changed else ''}"))
        if args.rows:
            _print_table(cohort.rows().column_names, cohort.rows().to_pylist(), sys.stdout)
        return 0
    if action == "diff":
        d = cohorts.diff(lake, args.name, args.other)
        if args.json:
            print(json.dumps(d.to_dict(), indent=2))
            return 0
        print(f"{d.a} -> {d.b}: {d.unchanged} unchanged, {len(d.added)} added, "
              f"{len(d.removed)} removed{', rows changed' if d.rows_changed else ''}")
        for uid in d.added:
            print(f"+ {uid}")
        for uid in d.removed:
            print(f"- {uid}")
        return 0
    # export
    from catalog.export import export

    show = args.progress and sys.stderr.isatty()
    bars: dict = {}

    def progress(stage: str, done: int, total: int) -> None:
        if show:
            from tqdm import tqdm

            bar = bars.get(stage) or bars.setdefault(
                stage, tqdm(total=total, unit="file" if stage == "dicom" else "series",
                            desc=stage, file=sys.stderr))
            bar.n = done
            bar.refresh()

    try:
        summary = export(lake, args.name, args.to, args.as_, progress,
                         key_file=_key_file(args))
    finally:
        for bar in bars.values():
            bar.close()
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2))
    else:
        files = "" if summary.as_ == "manifest" else (
            f"{summary.written} {summary.as_} files written, {summary.skipped_existing} "
            f"already there, {len(summary.not_exported)} not exported; ")
        print(f"exported cohort {summary.cohort} (snapshot {summary.snapshot}) as "
              f"{summary.as_} to {summary.to}: {summary.series} series, {summary.instances} "
              f"instances; {files}{summary.files} files in SHA256SUMS")
    # what was left out goes to stderr, one line per series or instance with its reason
    # code (also in export.json and, for NIfTI, manifest/nifti.csv)
    for uid, why in sorted(summary.not_exported.items()):
        print(f"lake cohort export: not exported {uid}: "
              f"{summary.reasons.get(uid, 'unknown')}: {why}", file=sys.stderr)
    return 0


# --- demo ---------------------------------------------------------------------

def cmd_demo(args) -> int:
    from etl.config import IngestConfig

    config = IngestConfig()
    _start_workers(config.scheduler)
    from catalog import open_lake
    from etl import ingest
    from lakehouse import Lake
    from synth import generate_archive

    root = Path(args.dir)
    archive, lake_dir, truth = root / "archive", root / "lake", root / "ground_truth.json"
    key_file = root / "lake.key"
    if args.fresh and root.exists():
        shutil.rmtree(root)
    if truth.exists() and archive.is_dir():
        print(f"using the sample archive already in {archive} (--fresh to regenerate)")
    else:  # generate aside, then rename: an interrupted run never leaves half an archive
        print(f"generating a sample hospital archive ({args.preset} preset, seed {args.seed}) "
              f"in {archive} ...")
        partial = root / "archive.partial"
        for leftover in (partial, archive):
            if leftover.exists():
                shutil.rmtree(leftover)
        generate_archive(partial, seed=args.seed, preset=args.preset,
                         truth_path=root / "ground_truth.partial")
        partial.rename(archive)
        (root / "ground_truth.partial").rename(truth)
    lake = Lake.open(lake_dir) if (lake_dir / "_lake").exists() else \
        Lake.create(lake_dir, profile="research", key_file=key_file)
    show = args.progress and sys.stderr.isatty()
    bar = None

    def progress(stage: str, done: int, total: int) -> None:
        nonlocal bar
        if show:
            from tqdm import tqdm

            if bar is None:
                bar = tqdm(total=total, unit="file", desc="ingest", file=sys.stderr)
            bar.total = total or None
            bar.n = done
            bar.refresh()

    summary = ingest(lake, archive, config, progress, key_file=key_file)
    if bar is not None:
        bar.close()
    _print_run(summary)
    with open_lake(lake_dir) as cat:
        print("\nrows per table")
        for name, n in cat.counts().items():
            print(f"  {name:<20} {n:>8,}")
        print("\nstudies per modality and year")
        _print_table(*_pivot(cat), sys.stdout)
        q = cat.con.execute(
            "SELECT reason, count(*) FROM quarantine GROUP BY 1 ORDER BY 1").fetchall()
        print("\nfiles quarantined by reason")
        for reason, n in q:
            print(f"  {reason:<32} {n}")
    where = lake_dir.absolute()
    print(f"\nthe lake is at {where}: a research lake (pseudonymized; its key is "
          f"{key_file.absolute()}, the identified vault is {where / 'vault'})")
    print("try next:")
    print(f'  lake sql "SELECT Modality, count(*) AS n FROM studies GROUP BY 1" --lake {where}')
    print(f"  lake status --lake {where}")
    print(f"  lake notebook --lake {where}")
    return 0


def _pivot(cat) -> tuple[list[str], list[dict]]:
    rows = cat.con.execute(
        "SELECT Modality, study_year, count(*) FROM studies GROUP BY ALL ORDER BY ALL"
    ).fetchall()
    years = sorted({y for _, y, _ in rows if y is not None})
    mods = sorted({m or "?" for m, _, _ in rows})
    table = {m: {str(y): 0 for y in years} for m in mods}
    for m, y, n in rows:
        if y is not None:
            table[m or "?"][str(y)] = n
    cols = ["Modality", *[str(y) for y in years], "total"]
    out = [{"Modality": m, **counts, "total": sum(counts.values())}
           for m, counts in table.items()]
    return cols, out


# --- notebook -----------------------------------------------------------------

def cmd_notebook(args) -> int:
    import secrets
    import signal

    lake = _lake_dir(args)
    from lakehouse import Lake

    Lake.open(lake)  # fail early, in one line, when there is no lake
    if not _has_module("jupyterlab"):
        raise CliError("JupyterLab is not installed: pip install 'imaging-lakehouse[notebooks]'")
    folder = Path(args.notebooks) if args.notebooks else _notebooks_dir()
    if not folder.is_dir():
        raise CliError(f"notebook folder {folder} does not exist; pass --notebooks DIR")
    if not _port_free(args.port):
        raise CliError(f"port {args.port} on 127.0.0.1 is in use (another JupyterLab?): "
                       "pass --port N")
    # our own token, so that the address printed below is the one to open (JupyterLab
    # prints "token=..." when the token is given); in the environment, not on the
    # command line where other users' `ps` would show it
    token = os.environ.get("JUPYTER_TOKEN") or secrets.token_urlsafe(24)
    env = {**os.environ, "LAKE_DIR": _shown(lake), "JUPYTER_TOKEN": token,
           "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
    cmd = [sys.executable, "-m", "jupyterlab", f"--notebook-dir={folder}",
           f"--ServerApp.port={args.port}", "--ServerApp.port_retries=0",
           "--ServerApp.ip=127.0.0.1"]
    if args.no_browser:
        cmd.append("--no-browser")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # JupyterLab refuses to start as root without this (containers often run as root);
        # the server only listens on 127.0.0.1 and needs the token
        cmd.append("--allow-root")
    print(f"JupyterLab at http://127.0.0.1:{args.port}/lab?token={token}\n"
          f"  lake {_shown(lake)} (LAKE_DIR); notebooks in {folder} (open a .py notebook "
          "with right-click > Open With > Notebook); Ctrl-C twice to stop", flush=True)
    proc = subprocess.Popen(cmd, env=env)
    # Ctrl-C reaches JupyterLab too (same process group), which asks for confirmation:
    # wait for it to stop instead of leaving it behind; pass SIGTERM on
    previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
                signal.SIGTERM: signal.signal(signal.SIGTERM,
                                              lambda signum, frame: proc.terminate())}
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _port_free(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _notebooks_dir() -> Path:
    here = Path(__file__).resolve().parent / "notebooks"
    if here.is_dir():
        return here
    raise CliError("no notebooks folder found next to the package; pass --notebooks DIR")


# --- reidentify -----------------------------------------------------------------

def cmd_reidentify(args) -> int:
    from catalog import open_lake
    from catalog.reidentify import reidentify

    values = list(args.values)
    if args.csv:
        # utf-8-sig: spreadsheet programs start their UTF-8 CSV files with a byte-order mark
        with open(args.csv, newline="", encoding="utf-8-sig") as fh:
            try:
                reader = csv.DictReader(fh)
                cols = [c.strip() for c in args.columns.split(",")] if args.columns else []
                missing = [c for c in cols if c not in (reader.fieldnames or [])]
                if not cols or missing:
                    raise CliError(f"--csv needs --columns naming columns of {args.csv} "
                                   f"(missing: {', '.join(missing) or 'none given'})")
                values += [row[c] for row in reader for c in cols if row[c]]
            except (UnicodeDecodeError, csv.Error) as exc:
                raise CliError(f"cannot read {args.csv} as a CSV file in UTF-8 ({exc}): save "
                               "it as CSV UTF-8") from None
    if not values:
        raise CliError("give pseudonyms to look up, or --csv FILE --columns A,B")
    with open_lake(_lake_dir(args), vault=True) as cat:
        table = reidentify(cat, values)
    rows = table.to_pylist()
    if args.format == "json":
        print(json.dumps(rows, ensure_ascii=False))
    else:
        _print_table(table.column_names, rows, sys.stdout)
    unknown = sum(1 for r in rows if r["original"] is None)
    if unknown:  # kept in the output (as empty rows, in input order), and said
        asked = len({r["pseudonym"] for r in rows})
        print(f"# {unknown} of {asked} pseudonyms are not in this lake's vault (a pseudonym "
              "of another lake or key, or a value that is not a pseudonym)", file=sys.stderr)
    return 1 if unknown and unknown == len(rows) else 0


# --- dictionary ---------------------------------------------------------------

def cmd_dictionary(args) -> int:
    from etl.errors import REASONS, SKIP_REASONS
    from lakehouse.dictionary import markdown, update

    codes = {"Quarantine reason codes (`quarantine.reason`, `files.reason`)": REASONS,
             "Skip reason codes (`files.reason` of skipped files)": SKIP_REASONS}
    if args.update:
        path = Path(args.update)
        try:
            path.write_text(update(path.read_text(encoding="utf-8"), codes), encoding="utf-8")
        except (OSError, ValueError) as exc:
            raise CliError(f"cannot update {path}: {exc}") from None
        print(f"updated the data dictionary in {path}")
        return 0
    print(markdown(codes))
    return 0


# --- verify -------------------------------------------------------------------

def cmd_verify(args) -> int:
    from lakehouse import Lake
    from lakehouse.verify import verify

    report = verify(Lake.open(_lake_dir(args)), sources=args.sources)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(f"snapshot {report.snapshot}: {report.files_checked} data files checked"
              + (f", {report.sources_checked} source files" if args.sources else ""))
        if report.files_without_checksum:
            print(f"  {report.files_without_checksum} data files have no recorded checksum "
                  "(size checked only)")
        for p in report.problems:
            print(f"  {p}")
        print("ok" if report.ok else f"{len(report.problems)} problems: restore the files "
              "named from a backup (or ingest the sources again)")
    return 0 if report.ok else EXIT_ERROR


# --- vacuum -------------------------------------------------------------------

def cmd_vacuum(args) -> int:
    from lakehouse import Lake
    from lakehouse.vacuum import vacuum

    report = vacuum(Lake.open(_lake_dir(args)), args.retention_hours, args.dry_run,
                    args.expire_days)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    if args.expire_days is not None:
        verb = "would expire" if args.dry_run else "expired"
        pinned = sorted({c for names in report.pinned.values() for c in names})
        print(f"{verb} {len(report.expired)} snapshots published more than "
              f"{args.expire_days:g} days ago"
              + (f" ({_ranges(report.expired)})" if report.expired else "")
              + (f"; kept {len(report.pinned)} older ones that saved cohorts pin "
                 f"({', '.join(pinned)})" if pinned else ""))
    n = sum(len(v) for v in report.removed.values())
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {n} unreferenced files ({report.bytes_removed:,} bytes); "
          f"{report.kept_recent} younger than {args.retention_hours:g} h kept")
    if report.log_removed:
        print(f"{verb} {sum(len(v) for v in report.log_removed.values())} commit-log files "
              f"no kept snapshot needs ({', '.join(sorted(report.log_removed))})")
    return 0


def _ranges(numbers: list[int]) -> str:
    """Sorted numbers as ranges: ``1-4, 7, 9-10``."""
    out: list[str] = []
    for n in sorted(numbers):
        if out and out[-1].split("-")[-1] == str(n - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{n}"
        else:
            out.append(str(n))
    return ", ".join(out)


def cmd_optimize(args) -> int:
    from lakehouse import Lake
    from lakehouse.optimize import MiB, optimize

    try:
        report = optimize(Lake.open(_lake_dir(args)), args.table or None,
                          small_bytes=int(args.small_mb * MiB),
                          target_bytes=int(args.target_mb * MiB), dry_run=args.dry_run)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    changed = {k: v for k, v in report.tables.items() if v.rewritten}
    verb = "would rewrite" if args.dry_run else "rewrote"
    for name, t in changed.items():
        print(f"{name}: {verb} {t.rewritten} small files as {t.written} "
              f"({t.files_before} -> {t.files_after} files, {t.rows:,} rows)")
    if not changed:
        print("nothing to compact")
    elif report.snapshot is not None:
        print(f"published snapshot {report.snapshot}; the replaced files stay for time travel "
              "until `lake vacuum` finds no snapshot that needs them")
    return 0


# --- wiring -------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lake", description="A local, SQL-queryable lake of a DICOM archive.")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def lake_opt(sp):
        sp.add_argument("--lake", help="lake folder, or s3://BUCKET/PREFIX (default: "
                        "$LAKE_DIR, then ./lake)")

    def compact_opt(sp):
        sp.add_argument("--compact-files", type=_non_negative, metavar="N",
                        default=16,  # IngestConfig.compact_files
                        help="at the end of a run, compact the small files of a table it "
                        "wrote to once that takes N files away (rows unchanged, as `lake "
                        "optimize` does; tiered: a partition's file of 2 MiB or more waits until "
                        "the small ones add up to half its size); 0: never (default "
                        "%(default)s)")

    def key_opt(sp):
        sp.add_argument("--key-file", help="pseudonymization key of a research lake (default: "
                        "$LAKE_KEY_FILE, then the key `lake init` created for the lake)")

    sp = sub.add_parser("init", help="create an empty lake")
    sp.add_argument("path", nargs="?", help="lake folder, or s3://BUCKET/PREFIX on "
                    "S3-compatible object storage (default: --lake, $LAKE_DIR, ./lake)")
    lake_opt(sp)
    sp.add_argument("--profile", choices=["research", "identified"], default="research",
                    help="research (default: pseudonymized tables, identifiers only in the "
                    "vault) or identified (originals kept, for internal quality work)")
    key_opt(sp)
    sp.add_argument("--private-tag", action="append", metavar="GROUP,CREATOR,ELEMENT",
                    help="keep this private attribute in a research lake (repeatable), e.g. "
                    "0x0019,GEMS_ACQU_01,0x23 (ELEMENT: the low byte); all others are dropped")
    sp.add_argument("--checksum", choices=["header", "full"], default="header",
                    help="what file_sha256 covers: header (default: the bytes before the pixel "
                    "data, so ingest never reads pixel data) or full (every byte: slower, "
                    "detects pixel-only changes and conflicts)")
    sp.set_defaults(func=cmd_init)

    sp = sub.add_parser("ingest", help="ingest a folder of DICOM files, or a PACS")
    sp.add_argument("source", help="folder (or file) to ingest, walked recursively; a PACS: "
                    "dicomweb+http://HOST:PORT/dicom-web, dimse://AE_TITLE@HOST:PORT "
                    "(dimse+tls:// over TLS); or an object store prefix: s3://BUCKET/PREFIX")
    sp.add_argument("--storage-options", metavar="FILE", help="object-store sources and "
                    "lakes: fsspec storage options as JSON (default: $LAKE_STORAGE_OPTIONS, "
                    "else the environment: AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ...)")
    sp.add_argument("--since", metavar="DATE", help="PACS sources: studies from this date "
                    "(YYYY-MM-DD) on")
    sp.add_argument("--filter", action="append", metavar="KEY=VALUE",
                    help="PACS sources: a query key (DICOM keyword), e.g. Modality=CT; "
                    "repeatable")
    sp.add_argument("--tls-ca", metavar="PEM", help="dimse+tls:// and dicomweb+https:// "
                    "sources: the CA certificates the PACS' certificate must be signed by "
                    "(default: the system's)")
    sp.add_argument("--tls-cert", metavar="PEM", help="dimse+tls:// and dicomweb+https:// "
                    "sources: our certificate, for a PACS that asks for one (mutual TLS)")
    sp.add_argument("--tls-key", metavar="PEM",
                    help="its private key (default: in --tls-cert)")
    lake_opt(sp)
    sp.add_argument("--workers", type=_positive, help="start a local Dask cluster of N worker "
                    "processes (default: Dask's local process scheduler, one per core)")
    sp.add_argument("--scheduler", help="address of a running Dask scheduler "
                    "(tcp://host:8786), or processes / threads / synchronous")
    sp.add_argument("--scheduler-timeout", type=_positive_float, default=10.0,
                    help="seconds to wait for a --scheduler (and its first worker) "
                    "before giving up (default 10)")
    sp.add_argument("--batch-files", type=_positive, default=512,  # IngestConfig.batch_files
                    help="files per Dask task (default %(default)s)")
    sp.add_argument("--relist", action="store_true", help="list every folder of the source "
                    "again (by default a folder whose mtime and ctime are unchanged since the "
                    "last run keeps that run's listing; every file is checked either way)")
    compact_opt(sp)
    sp.add_argument("--no-progress", dest="progress", action="store_false",
                    help="no progress bar (also off when stderr is not a terminal)")
    sp.add_argument("--json", action="store_true", help="print the run summary as JSON")
    key_opt(sp)
    sp.set_defaults(func=cmd_ingest)

    sp = sub.add_parser("listen", help="receive DICOM instances (C-STORE) and ingest them in "
                        "micro-batches")
    sp.add_argument("--port", type=_positive, required=True, help="TCP port to listen on")
    sp.add_argument("--ae-title", required=True, type=_ae_title,
                    help="our AE title (what senders call): 1 to 16 ASCII characters")
    sp.add_argument("--host", default="0.0.0.0", help="address to bind (default: all)")
    sp.add_argument("--batch-seconds", type=_positive_float, default=10.0,
                    help="ingest what was received every N seconds (default 10); a "
                    "batch that fails (the lake busy) is tried again after 2N, 4N, ... "
                    "seconds, at most 300 (or N)")
    sp.add_argument("--batch-files", type=_positive, default=1000,
                    help="... or as soon as N instances are waiting (default 1000)")
    sp.add_argument("--allow", action="append", type=_sender, metavar="SENDER",
                    help="accept associations only from this sender (repeatable): an AE "
                    "title, TITLE@ADDRESS or @ADDRESS (an IP address or network, e.g. "
                    "@10.1.0.0/16); others are rejected (default: any sender)")
    sp.add_argument("--tls-cert", metavar="PEM", help="use TLS (DICOM's secure transport, "
                    "TLS 1.2 or later) with this certificate (PEM, its chain after it); "
                    "senders that do not speak TLS are refused")
    sp.add_argument("--tls-key", metavar="PEM",
                    help="the certificate's private key (default: in --tls-cert)")
    sp.add_argument("--tls-ca", metavar="PEM", help="require every sender to present a "
                    "certificate signed by one of these CA certificates (mutual TLS)")
    sp.add_argument("--allow-cert", action="append", type=_cert_name,
                    metavar="NAME[=TITLE]",
                    help="with --tls-ca: accept only senders whose certificate gives this "
                    "name (repeatable): its subject's common name or a subject alternative "
                    "name (DNS name, IP address, e-mail), ignoring case; *.DOMAIN matches "
                    "one more label (default: any certificate the CAs signed). With "
                    "=TITLE, that certificate may call as this AE title only (repeat the "
                    "name for more titles); others are rejected")
    sp.add_argument("--workers", type=_positive, help="worker processes per batch")
    sp.add_argument("--scheduler", help="a Dask scheduler address, or processes / threads / "
                    "synchronous")
    sp.add_argument("--scheduler-timeout", type=_positive_float, default=10.0)
    compact_opt(sp)
    lake_opt(sp)
    key_opt(sp)
    sp.set_defaults(func=cmd_listen)

    sp = sub.add_parser("sql", help="run a SQL query (DuckDB) against the lake")
    sp.add_argument("query", help="the query, or - to read it from stdin")
    lake_opt(sp)
    sp.add_argument("--format", choices=["table", "json", "csv"], default="table",
                    help="table (default: readable columns), json (one array of row objects; "
                    "dates and times as ISO strings, NaN as null) or csv (a header line, then "
                    "rows; lists as JSON)")
    sp.add_argument("--snapshot", type=_non_negative, help="query an earlier lake snapshot")
    sp.set_defaults(func=cmd_sql)

    sp = sub.add_parser(
        "report", help="quality reports: utilization, repeat exams, retakes, CT dose",
        description="Figures grouped by --by (any column of the report's study view, e.g. "
        "month, week, day, weekday, hour, Modality, BodyPartExamined, StationName, "
        "Manufacturer, ManufacturerModelName, InstitutionalDepartmentName); --studies lists "
        "the studies (repeats: the study pairs; retakes: the retaken views) behind them.")
    sp.add_argument("kind", choices=["utilization", "repeats", "retakes", "dose"])
    lake_opt(sp)
    sp.add_argument("--from", dest="date_from", metavar="YYYY-MM-DD",
                    help="first study date (inclusive)")
    sp.add_argument("--to", dest="date_to", metavar="YYYY-MM-DD",
                    help="last study date (inclusive)")
    sp.add_argument("--by", metavar="COLS", help="comma-separated grouping columns (default: "
                    "utilization month,Modality; repeats Modality; retakes StationName; "
                    "dose BodyPartExamined)")
    sp.add_argument("--window", type=_non_negative, default=30, metavar="DAYS",
                    help="repeats: a study within DAYS days of an earlier matching one is a "
                    "repeat (default 30)")
    sp.add_argument("--match", "--keys", dest="match", metavar="COLS",
                    help="repeats: columns that must match besides the patient (default "
                    "Modality,BodyPartExamined; add protocol (= ProtocolName) or description "
                    "(= StudyDescription) for a narrower definition)")
    sp.add_argument("--keep-localizers", action="store_true",
                    help="repeats: count studies of localizer images only as exams")
    sp.add_argument("--keep-derived", action="store_true",
                    help="repeats: count studies of derived images only as exams")
    sp.add_argument("--keep-secondary", action="store_true",
                    help="repeats: count studies of secondary captures only as exams")
    sp.add_argument("--drl", metavar="FILE", help="dose: diagnostic reference levels CSV "
                    "(default: the example levels shipped in catalog/drl_default.csv)")
    sp.add_argument("--exceedances", action="store_true",
                    help="dose: list the studies above their reference level")
    sp.add_argument("--where", action="append", metavar="COL=VALUE",
                    help="keep rows whose COL equals VALUE (as text); repeatable")
    sp.add_argument("--studies", action="store_true",
                    help="list the studies behind the figures instead of the figures")
    sp.add_argument("--format", choices=["table", "json", "csv"], default="table")
    sp.add_argument("--snapshot", type=_non_negative, help="report on an earlier lake snapshot")
    sp.set_defaults(func=cmd_report)

    sp = sub.add_parser("status", help="tables (rows, data files), snapshot, quarantine and "
                        "recent runs")
    lake_opt(sp)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_status)

    sp = sub.add_parser("cohort", help="save, list, show, diff and export reproducible cohorts")
    csub = sp.add_subparsers(dest="cohort_command", required=True, parser_class=_Parser)
    c = csub.add_parser("save", help="run a cohort definition and pin it to the lake snapshot")
    c.add_argument("name", help="cohort name (letters, digits, _ - .)")
    c.add_argument("--sql", help="a query returning one row per series (SeriesInstanceUID) "
                   "or per study (StudyInstanceUID); - reads it from stdin")
    c.add_argument("--spec", help="a declarative spec file (YAML: modality, body_part, "
                   "study_date, age, ..., feature thresholds, with all/any/not; README "
                   "'Cohorts'); a feature criterion's parameter file is read relative to it")
    c.add_argument("--description", help="free text saved with the cohort")
    c.add_argument("--replace", action="store_true", help="overwrite a saved cohort")
    c.add_argument("--snapshot", type=_non_negative,
                   help="pin to an earlier lake snapshot (default: the latest)")
    c = csub.add_parser("list", help="saved cohorts")
    c.add_argument("--json", action="store_true")
    c = csub.add_parser("show", help="a saved cohort, reproduced at its snapshot, and drift")
    c.add_argument("name")
    c.add_argument("--rows", action="store_true", help="also print the rows")
    c.add_argument("--json", action="store_true")
    c = csub.add_parser("diff", help="members of a cohort versus another (default: now)")
    c.add_argument("name")
    c.add_argument("other", nargs="?", help="another saved cohort (default: the same "
                   "definition at the latest snapshot)")
    c.add_argument("--json", action="store_true")
    c = csub.add_parser("export", help="export a saved cohort (manifest, DICOM or NIfTI)")
    c.add_argument("name")
    c.add_argument("--to", required=True, help="output folder (resumable)")
    c.add_argument("--as", dest="as_", choices=["manifest", "dicom", "nifti"],
                   default="manifest", help="manifest (default: Parquet and CSV of series and "
                   "instances with checksums), dicom (copies; de-identified from a research "
                   "lake) or nifti (one volume per regular series, with a JSON sidecar)")
    c.add_argument("--no-progress", dest="progress", action="store_false")
    c.add_argument("--json", action="store_true")
    key_opt(c)
    for c in csub.choices.values():
        lake_opt(c)
    sp.set_defaults(func=cmd_cohort)

    sp = sub.add_parser("demo", help="generate a sample archive, ingest it, print a summary")
    sp.add_argument("--dir", default="lake-demo",
                    help="folder for the archive and the lake (default ./lake-demo)")
    sp.add_argument("--preset", choices=["test", "demo", "bench"], default="demo",
                    help="archive size: test (about 300 files), demo (default, about 2,000) "
                    "or bench (about 20,000 files, mostly 512x512 CT: about 9 GB)")
    sp.add_argument("--seed", type=int, default=0,
                    help="random seed of the generator (default 0): same seed, same archive")
    sp.add_argument("--fresh", action="store_true", help="delete --dir first")
    sp.add_argument("--no-progress", dest="progress", action="store_false")
    sp.set_defaults(func=cmd_demo)

    sp = sub.add_parser("notebook", help="JupyterLab with the lake attached (LAKE_DIR)")
    lake_opt(sp)
    sp.add_argument("--port", type=_positive, default=8888,
                    help="port on 127.0.0.1 (default 8888); a port in use is an error")
    sp.add_argument("--notebooks", help="notebook folder (default: the project's notebooks/)")
    sp.add_argument("--no-browser", action="store_true", help="do not open a web browser; "
                    "open the address printed (it carries the access token)")
    sp.set_defaults(func=cmd_notebook)

    sp = sub.add_parser("features", help="series geometry, image statistics and radiomics")
    lake_opt(sp)
    which = sp.add_mutually_exclusive_group()
    which.add_argument("--series", action="append", metavar="UID",
                       help="image series to compute (repeatable; default: all)")
    which.add_argument("--cohort", metavar="NAME", help="the image series of a saved cohort")
    sp.add_argument("--params", metavar="FILE", help="radiomics parameter YAML "
                    "(default: the extractor's default.yaml)")
    sp.add_argument("--mask-file", action="append", metavar="SERIES_UID=PATH",
                    help="a NIfTI/NRRD label map on the grid of that series (repeatable)")
    sp.add_argument("--workers", type=_positive)
    sp.add_argument("--scheduler", help="processes (default), threads, synchronous, "
                    "local-cluster or a Dask scheduler address")
    sp.set_defaults(func=cmd_features)

    sp = sub.add_parser("reidentify", help="map pseudonyms back to identifiers (vault holders "
                        "only; audited)")
    sp.add_argument("values", nargs="*", help="pseudonyms (PatientID, AccessionNumber, StudyID, "
                    "UIDs) to look up")
    lake_opt(sp)
    sp.add_argument("--csv", help="a CSV result whose --columns hold pseudonyms")
    sp.add_argument("--columns", help="comma-separated columns of --csv to look up")
    sp.add_argument("--format", choices=["table", "json"], default="table")
    sp.set_defaults(func=cmd_reidentify)

    sp = sub.add_parser("verify", help="check every data file against the commit log")
    lake_opt(sp)
    sp.add_argument("--sources", action="store_true",
                    help="also check every source file against its recorded file_sha256")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_verify)

    sp = sub.add_parser("vacuum", help="delete files no snapshot references (left by killed "
                        "runs) once older than the retention period; with --expire-days, "
                        "also expire old snapshots")
    lake_opt(sp)
    sp.add_argument("--retention-hours", type=_non_negative_float, default=168.0,
                    help="keep unreferenced files younger than this (default 168)")
    sp.add_argument("--expire-days", type=_non_negative_float, metavar="DAYS",
                    help="first forget the snapshots published more than DAYS ago, except "
                    "the latest and those saved cohorts pin, so that the files only they "
                    "reference (e.g. rewritten by compaction), and the commit-log files "
                    "only they need, are deleted too (default: keep every snapshot)")
    sp.add_argument("--dry-run", action="store_true", help="list, do not delete")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_vacuum)

    sp = sub.add_parser("optimize", help="compact small Parquet files (rows unchanged)")
    lake_opt(sp)
    sp.add_argument("--table", action="append", help="only this table (repeatable; default all)")
    sp.add_argument("--small-mb", type=_positive_float, default=64.0,
                    help="files smaller than this are compacted (default 64)")
    sp.add_argument("--target-mb", type=_positive_float, default=256.0,
                    help="size of the files written, about (default 256)")
    sp.add_argument("--dry-run", action="store_true", help="report, do not rewrite")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_optimize)

    sp = sub.add_parser("dictionary", help="print the data dictionary (Markdown)")
    sp.add_argument("--update", metavar="FILE", help="rewrite the section between the "
                    "data-dictionary markers of FILE (e.g. README.md) instead of printing")
    sp.set_defaults(func=cmd_dictionary)
    return p


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


def _positive_float(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not 0 < x < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return x


def _ae_title(text: str) -> str:
    """A DICOM AE title (:func:`etl.sources.listen.is_ae_title`)."""
    from etl.sources.listen import is_ae_title

    if not is_ae_title(text):
        raise argparse.ArgumentTypeError(
            f"expected an AE title of 1 to 16 ASCII characters (no backslash), got {text!r}")
    return text


def _tls_client(args):
    """``lake ingest``'s TLS context for a ``dimse+tls://`` or ``dicomweb+https://``
    source (None: no option given: the defaults)."""
    if not (args.tls_ca or args.tls_cert or args.tls_key):
        return None
    if not args.source.startswith(("dimse+tls://", "dicomweb+https://")):
        raise CliError("--tls-ca, --tls-cert and --tls-key apply to dimse+tls:// and "
                       "dicomweb+https:// sources")
    if args.tls_key and not args.tls_cert:
        raise CliError("--tls-key needs --tls-cert (the certificate it is the key of)")
    from etl.sources.tls import client_context

    try:
        return client_context(args.tls_ca, args.tls_cert, args.tls_key)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _tls(args):
    """The listener's TLS context from ``--tls-cert/--tls-key/--tls-ca`` (None: none)."""
    if args.allow_cert and not (args.tls_cert and args.tls_ca):
        raise CliError("--allow-cert needs --tls-cert and --tls-ca: only the certificates "
                       "of senders that the CAs verified have names to check")
    if args.tls_cert is None:
        if args.tls_key or args.tls_ca:
            raise CliError("--tls-key and --tls-ca need --tls-cert (the listener's own "
                           "certificate)")
        return None
    from etl.sources.tls import server_context

    try:
        return server_context(args.tls_cert, args.tls_key, args.tls_ca)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _cert_name(text: str):
    from etl.sources.listen import AllowedCert

    try:
        return AllowedCert.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _sender(text: str):
    from etl.sources.listen import Sender

    try:
        return Sender.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _non_negative_float(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not 0 <= x < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return x


def _non_negative(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return n


def _os_error(exc: OSError) -> str:
    """An operating-system error as one line that names the file and the next step."""
    from lakehouse.errors import one_line, storage_fault

    what = one_line(exc.strerror or str(exc) or type(exc).__name__)
    if storage_fault(what):
        return _storage_failed(what)
    where = f" ({exc.filename})" if exc.filename else ""
    hint = {errno.EACCES: "check the permissions of that folder, or choose another one",
            errno.EPERM: "check the permissions of that folder, or choose another one",
            errno.EROFS: "the file system is read-only: choose a writable folder",
            errno.ENOSPC: "the disk is full: free space, or choose another folder",
            errno.ENOTDIR: "a file is in the way where a folder should be: choose another path",
            errno.EEXIST: "a file is in the way where a folder should be: choose another path",
            errno.ENOENT: "check the path",
            }.get(exc.errno or 0, "check the path and its permissions")
    return f"{what}{where}: {hint}"


def _delta_error(text: str) -> str:
    """A failure to read the lake's tables as one line with the next step: run again when
    the storage failed to answer, else `lake verify` (is something damaged?)."""
    from lakehouse.errors import storage_fault

    if storage_fault(text):
        return _storage_failed(text)
    return f"a table of the lake cannot be read: {text}; `lake verify` lists what is " \
           "damaged (restore that from a backup); if it lists nothing, the storage failed " \
           "to answer: run the command again"


def _storage_failed(text: str) -> str:
    """The one line for a storage that did not answer properly (``text``: its error)."""
    return f"the lake's storage did not answer properly: {text}; run the command again " \
           "(a failed run leaves the lake as it was)"


class _OneLineFormatter(logging.Formatter):
    """Log lines as one line where a library's message is a coloured chain of causes
    (deltalake's object store errors); tracebacks (``-vv``) as they are."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        text = super().formatMessage(record)
        if "\x1b[" not in text and "↳" not in text:
            return text
        from lakehouse.errors import one_line

        return one_line(text, 1000)


def _below_critical_from_pydicom(record: logging.LogRecord) -> bool:
    """False for what pydicom (or a module of it) logs below CRITICAL."""
    return record.levelno >= logging.CRITICAL or not (
        record.name == "pydicom" or record.name.startswith("pydicom."))


def main(argv: list[str] | None = None) -> int:
    from deltalake.exceptions import DeltaError

    from lakehouse.errors import LakeError, one_line

    args = build_parser().parse_args(argv)
    #: the command has the process to itself (the `lake` program, not a call of main())
    args.own_process = argv is None
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if args.own_process:
        for handler in logging.getLogger().handlers:
            handler.setFormatter(_OneLineFormatter("%(levelname)s %(name)s: %(message)s"))
    if args.verbose < 2:
        import warnings

        warnings.filterwarnings("ignore", module="pydicom")
        # pydicom logs what it tolerates in a header (quoting raw values), and every decoder
        # plugin that fails (with a traceback) before another one succeeds: -vv shows them.
        logging.getLogger("pydicom").setLevel(logging.CRITICAL)
        if args.own_process:  # importing pydicom sets its logger's level back to WARNING
            for handler in logging.getLogger().handlers:
                handler.addFilter(_below_critical_from_pydicom)
    try:
        return args.func(args)
    except (LakeError, CliError) as exc:
        print(f"lake {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"lake {args.command}: interrupted", file=sys.stderr)
        return 130
    except DeltaError as exc:  # a table folder or commit log damaged or removed
        logging.getLogger("lake").debug("%s failed", args.command, exc_info=True)
        text = one_line(str(exc)) or type(exc).__name__
        print(f"lake {args.command}: error: {_delta_error(text)}", file=sys.stderr)
        return EXIT_ERROR
    except UnicodeEncodeError as exc:  # a non-UTF-8 terminal and a name in Japanese
        print(f"lake {args.command}: error: the output holds characters that the output "
              f"encoding ({exc.encoding}) cannot write: use a UTF-8 locale (LANG=C.UTF-8) or "
              "set PYTHONIOENCODING=utf-8", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:  # `lake sql ... | head`: the reader has what it wanted
        return 0
    except OSError as exc:  # a folder that cannot be written, a file where a folder goes...
        logging.getLogger("lake").debug("%s failed", args.command, exc_info=True)
        print(f"lake {args.command}: error: {_os_error(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:
        if not type(exc).__module__.startswith(("duckdb", "_duckdb")):
            raise
        # DuckDB reading the lake's files failed (its file system raised: an object store
        # that did not answer); a mistake in `lake sql` is that command's own error
        logging.getLogger("lake").debug("%s failed", args.command, exc_info=True)
        print(f"lake {args.command}: error: {_delta_error(one_line(str(exc)))}",
              file=sys.stderr)
        return EXIT_ERROR
    finally:
        # Arrow dataset scanners still referenced at interpreter shutdown can abort the
        # process after the work is done (apache/arrow#34314): collect them while Arrow's
        # thread pools are alive
        import gc

        gc.collect()


if __name__ == "__main__":
    sys.exit(main())
