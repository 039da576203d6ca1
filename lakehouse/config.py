"""Lake-level settings, stored in the lake's own manifest (``_lake/lake.json``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

PROFILES = ("research", "identified")
#: What a lake's file checksums cover (see ``LakeConfig.checksum``)
CHECKSUMS = ("header", "full")
FORMAT_VERSION = 1


@dataclass(frozen=True)
class LakeConfig:
    """What a lake is; written once by ``lake init``, read by every command."""

    #: ``research`` (pseudonymized tables only) or ``identified`` (originals kept,
    #: for hospital-internal quality work).
    profile: str = "research"
    #: Random id of the lake (names its default key file).
    lake_id: str = ""
    #: Fingerprint of the pseudonymization key (research lakes); never the key.
    key_fingerprint: str | None = None
    #: Private attributes kept in research lakes: ``{"group": "0x0019",
    #: "creator": "GEMS_ACQU_01", "element": "0x23"}`` (element: the low byte).
    private_allowlist: list[dict] = field(default_factory=list)
    #: On-disk format of the lake folder; bumped when the layout changes.
    format_version: int = FORMAT_VERSION
    #: Schema version of the tables (see ``lakehouse.schemas.SCHEMA_VERSION``).
    schema_version: int = 1
    #: Creation time, ISO 8601 UTC.
    created_at: str = ""
    #: What ``file_sha256`` covers: ``header`` (the bytes before the Pixel Data element,
    #: so ingest never reads pixel data; the default of new lakes) or ``full`` (every
    #: byte of the file). Fixed at ``lake init``; lakes made before this setting are
    #: ``full``.
    checksum: str = "full"
    #: Free-form labels the user gave at init (site name, ...).
    labels: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LakeConfig:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})
