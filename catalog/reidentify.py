"""Map pseudonyms of a result back to the original identifiers (vault holders only).

Every call is written to the vault's audit log before anything is returned.
"""

from __future__ import annotations

from collections.abc import Iterable

import pyarrow as pa

from catalog.connect import Catalog
from lakehouse import audit
from lakehouse.errors import LakeError


class ReidentifyError(LakeError):
    def __init__(self, detail: str):
        self.detail = detail
        super().__init__(detail)


def reidentify(cat: Catalog, pseudonyms: Iterable[str]) -> pa.Table:
    """Rows (kind, pseudonym, original) for each known pseudonym, in input order."""
    if cat.lake.profile != "research":
        raise ReidentifyError("this is an identified lake: its tables already hold the "
                              "original identifiers")
    if "identifiers" not in cat.tables:
        raise ReidentifyError("the vault is not attached: open the lake with vault=True "
                              "(needs read access to the lake's vault/ folder)")
    values = list(dict.fromkeys(str(v).strip() for v in pseudonyms if str(v).strip()))
    wanted = pa.table({"pseudonym": pa.array(values, pa.string()),
                       "position": pa.array(range(len(values)), pa.int64())})
    cat.con.register("_wanted", wanted)
    try:
        result = cat.con.sql(
            "SELECT i.kind, w.pseudonym, i.original FROM _wanted w "
            "LEFT JOIN identifiers i ON i.pseudonym = w.pseudonym ORDER BY w.position, i.kind"
        ).to_arrow_table()
    finally:
        cat.con.unregister("_wanted")
    audit.record(cat.lake, "reidentify", text="\n".join(values),
                 snapshot=cat.snapshot.number, rows=result.num_rows)
    return result
