"""Run one ingest in its own process (the process the crash and concurrency tests kill).

``python -m tests.ingest_driver SOURCE LAKE [SCHEDULER] [FLUSH_ROWS] [BATCH_FILES]``
(the key of a research lake from ``$LAKE_KEY_FILE``, as for the ``lake`` command)
"""

from __future__ import annotations

import json
import os
import sys

from etl import IngestConfig, ingest
from lakehouse import Lake


def main(argv: list[str]) -> int:
    source, lake = argv[0], argv[1]
    scheduler = argv[2] if len(argv) > 2 else "synchronous"
    flush_rows = int(argv[3]) if len(argv) > 3 else 40
    batch_files = int(argv[4]) if len(argv) > 4 else 16
    config = IngestConfig(scheduler=scheduler, workers=2, flush_rows=flush_rows,
                          batch_files=batch_files, batches_per_worker=1)
    summary = ingest(Lake.open(lake), source, config,
                     key_file=os.environ.get("LAKE_KEY_FILE"))
    print(json.dumps(summary.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
