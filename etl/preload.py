"""What the fork server of a local process pool imports before it forks any worker.

:class:`etl.runners.LocalRunner` forks its worker processes from a
``multiprocessing`` fork server. The server imports this module once: the worker code
with its libraries (pydicom, pyarrow, numba: about a second of CPU), and
:func:`etl.extract.warm_up` loads the batch path's compiled code. Each worker forked
from it starts with all of that done, instead of every worker doing it again.
"""

import contextlib
import gc

from etl.extract import warm_up

# the server must start whatever happens here: each worker then loads the code at its
# first batch, and a batch path that cannot run reads its batches file by file
with contextlib.suppress(Exception):
    warm_up()

# what the server holds now is shared with every worker forked from it: kept out of the
# collector's generations, so that collections in a worker do not copy those pages
gc.freeze()
