"""An S3-compatible object store as a source: a moto server on loopback, s3fs."""

from __future__ import annotations

import json

import pytest

from lake_cli import main
from lakehouse import Lake
from tests.etl.cluster import RUN_COLUMNS, lake_content
from tests.pacs import free_port


@pytest.fixture(scope="module")
def s3(archive):
    """A moto S3 server on 127.0.0.1 holding the sample archive under s3://pacs/archive/."""
    s3fs = pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    port = free_port()
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    options = {"key": "testing", "secret": "testing",
               "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}",
                                 "region_name": "us-east-1"}}
    import boto3

    boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                 aws_access_key_id="testing", aws_secret_access_key="testing"
                 ).create_bucket(Bucket="pacs")
    fs = s3fs.S3FileSystem(**options)
    fs.put(str(archive[0]) + "/", "pacs/archive/", recursive=True)
    try:
        yield fs, options
    finally:
        server.stop()


@pytest.mark.slow
def test_ingest_from_s3_equals_the_folder_ingest(s3, archive, truth, built_lake, tmp_path,
                                                 capsys):
    fs, options = s3
    opts = tmp_path / "s3.json"
    opts.write_text(json.dumps(options))
    path = tmp_path / "lake"
    Lake.create(path, profile="identified")
    argv = ["ingest", "s3://pacs/archive", "--lake", str(path), "--storage-options", str(opts),
            "--scheduler", "threads", "--workers", "2", "--json", "--no-progress"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["listed"] == out["fetched"] == truth.files_total and out["failed"] == 0
    assert out["run"]["outcomes"] == truth.outcomes
    assert out["run"]["quarantine_reasons"] == truth.quarantine_reasons
    # every research table as the folder ingest made it (paths in the vault differ)
    ours, folder = lake_content(path), lake_content(built_lake[0])
    for name in RUN_COLUMNS:
        if name != "files":
            assert ours[name] == folder[name], name
    # quarantined and skipped files stay in the vault's staging, under their keys
    kept = out["kept_in_staging"]
    assert kept == truth.outcomes["quarantined"] + truth.outcomes["skipped"] + \
        truth.outcomes["conflict"]
    # nothing new: nothing fetched; a changed object is fetched again
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert (again["already_fetched"], again["fetched"]) == (truth.files_total, 0)
    first = sorted(fs.find("pacs/archive"))[0]
    fs.pipe(first, b"not DICOM any more")
    assert main(argv) == 0
    third = json.loads(capsys.readouterr().out)
    assert third["fetched"] == 1 and third["run"]["quarantine_reasons"] == {"not_dicom": 1}


@pytest.mark.slow
def test_object_store_errors_are_one_line(s3, tmp_path, capsys):
    _fs, options = s3
    path = tmp_path / "lake"
    Lake.create(path, profile="identified")
    opts = tmp_path / "s3.json"
    opts.write_text(json.dumps(options))
    code = main(["ingest", "s3://no-such-bucket/x", "--lake", str(path),
                 "--storage-options", str(opts)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "no such bucket or prefix" in err
    code = main(["ingest", "s3://pacs/archive", "--lake", str(path), "--storage-options",
                 str(tmp_path / "missing.json")])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "cannot read storage options" in err
    code = main(["ingest", "s3://pacs/archive", "--lake", str(path), "--filter", "Modality=CT",
                 "--storage-options", str(opts)])
    assert code == 1 and "apply to PACS sources only" in capsys.readouterr().err
