"""An object store whose answers break: a real S3 server (moto, its own process) behind a
real HTTP proxy on loopback (:mod:`tests.faultproxy`) that cuts object bodies short or
damages their bytes.

What must hold: an object is staged only when its bytes are the object listed (its
size, and its MD5 where the ETag is one); one that is not is read again, and failing
twice is retried by the next run, never quarantined as if the store held it damaged.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from catalog import open_lake
from etl import IngestConfig
from etl.sources import ingest_remote
from etl.sources.objects import ObjectStoreSource
from lakehouse import Lake
from tests.faultproxy import FaultProxy
from tests.s3server import KEY, REGION, SECRET, moto_bucket

CONFIG = IngestConfig(scheduler="threads", workers=2, batch_files=64)
FILES = ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "JPEG2000.dcm", "emri_small.dcm",
         "SC_rgb.dcm")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto server holding pydicom's files under s3://pacs/a/."""
    with moto_bucket(tmp_path_factory, "pacs") as server:
        client = server.client()
        for name in FILES:
            client.put_object(Bucket="pacs", Key=f"a/{name}",
                              Body=Path(get_testdata_file(name)).read_bytes())
        yield server


def _objects(path: str) -> bool:
    return path.startswith("/pacs/a/") and "list-type" not in path


#: the answer headers of S3's flexible checksums (botocore checks them when present)
CHECKSUMS = ("x-amz-checksum",)


def _pull(proxy: FaultProxy, lake: Lake):
    options = {"key": KEY, "secret": SECRET,
               "client_kwargs": {"endpoint_url": proxy.url, "region_name": REGION}}
    return ingest_remote(lake, ObjectStoreSource("s3://pacs/a", options), CONFIG)


def _quarantine(path: Path) -> list:
    with open_lake(path) as cat:
        return cat.con.execute("SELECT reason, count(*) FROM quarantine GROUP BY 1").fetchall()


@pytest.mark.parametrize("checksums", [True, False], ids=["checksums", "no-checksums"])
@pytest.mark.parametrize("fault", ["close", "garbage"])
def test_an_object_read_wrong_once_is_read_again(s3, tmp_path, fault, checksums):
    seen: set[str] = set()

    def plan(path: str, n: int) -> str | None:
        if _objects(path) and path not in seen:
            seen.add(path)
            return fault
        return None

    lake = Lake.create(tmp_path / "lake", profile="identified")
    with FaultProxy(s3.endpoint, plan, seed=7,
                    drop_headers=() if checksums else CHECKSUMS) as proxy:
        pulled = _pull(proxy, lake)
        assert proxy.applied == {fault: len(FILES)}
    assert (pulled.listed, pulled.fetched, pulled.failed) == (len(FILES), len(FILES), 0)
    assert pulled.run.outcomes["ingested"] == len(FILES)
    assert _quarantine(tmp_path / "lake") == []


@pytest.mark.parametrize("checksums", [True, False], ids=["checksums", "no-checksums"])
@pytest.mark.parametrize("fault", ["close", "garbage"])
def test_an_object_read_wrong_twice_is_retried_next_run(s3, tmp_path, fault, checksums):
    broken = "CT_small.dcm"

    def plan(path: str, n: int) -> str | None:
        return fault if _objects(path) and path.endswith(broken) else None

    lake = Lake.create(tmp_path / "lake", profile="identified")
    with FaultProxy(s3.endpoint, plan, seed=8,
                    drop_headers=() if checksums else CHECKSUMS) as proxy:
        pulled = _pull(proxy, lake)
        assert proxy.applied == {fault: 2}
        assert (pulled.fetched, pulled.failed) == (len(FILES) - 1, 1)
        (why,) = json.loads(Path(pulled.state_file).read_text())["failed"].values()
        if checksums:  # botocore finds the damage
            assert re.fullmatch(r"FlexibleChecksumError: Expected checksum \S+ did not match "
                                r"calculated checksum: \S+, twice; retried next run", why), why
        else:
            assert re.fullmatch(
                r"(read \d+ bytes of the 39206 listed|the bytes read do not match the "
                r"object's ETag \(MD5\)), twice \(cut short or damaged in transfer, or "
                r"changed since it was listed\); retried next run", why), why
        assert _quarantine(tmp_path / "lake") == []
        proxy.plan = lambda path, n: None
        again = _pull(proxy, lake)
    assert (again.already_fetched, again.fetched, again.failed) == (len(FILES) - 1, 1, 0)
    assert again.run.outcomes["ingested"] == 1 and _quarantine(tmp_path / "lake") == []


def test_an_object_is_read_at_most_twice(s3, tmp_path):
    """A read that fails (botocore finds its checksum wrong), then a read whose bytes are
    wrong (the store's checksums left out this time): two reads, not three."""
    broken = "CT_small.dcm"
    reads = 0

    def plan(path: str, n: int) -> str | None:
        nonlocal reads
        if not (_objects(path) and path.endswith(broken)):
            return None
        reads += 1
        proxy.drop_headers = CHECKSUMS if reads > 1 else ()
        return "garbage"

    lake = Lake.create(tmp_path / "lake", profile="identified")
    with FaultProxy(s3.endpoint, plan, seed=9) as proxy:
        pulled = _pull(proxy, lake)
    assert reads == 2 and proxy.applied == {"garbage": 2}
    assert (pulled.fetched, pulled.failed) == (len(FILES) - 1, 1)
    (why,) = json.loads(Path(pulled.state_file).read_text())["failed"].values()
    assert why == ("the bytes read do not match the object's ETag (MD5), after a failed "
                   "read; retried next run")
    assert _quarantine(tmp_path / "lake") == []


def test_etags_that_are_not_md5s_are_not_held_against_the_objects(s3, tmp_path, caplog):
    """Encrypted objects (SSE-KMS, SSE-C) have ETags that look like MD5s and are not: a
    listing whose ETags are all wrong (the proxy changes them) still fetches every
    object, each read twice only until the run knows."""
    def wrong_etags(path: str, body: bytes) -> bytes:
        if "list-type" not in path:
            return body
        return re.sub(rb"(<ETag>(?:&#34;|&quot;|\")?)[0-9a-f]{32}",
                      rb"\g<1>0123456789abcdef0123456789abcdef", body)

    lake = Lake.create(tmp_path / "lake", profile="identified")
    with FaultProxy(s3.endpoint, lambda path, n: None, rewrite=wrong_etags,
                    drop_headers=CHECKSUMS) as proxy, \
            caplog.at_level(logging.INFO, logger="etl.sources.objects"):
        pulled = _pull(proxy, lake)
        reads = proxy.count
    assert (pulled.listed, pulled.fetched, pulled.failed) == (len(FILES), len(FILES), 0)
    assert pulled.run.outcomes["ingested"] == len(FILES)
    assert "are not MD5s of the objects (encrypted objects?): not checked" in caplog.text
    assert reads == 1 + len(FILES) + 1  # the listing, each object, one object again
