"""Conversion plans, pure functions of metadata: pieces (read -> compute -> write) for base weights and adapters, expert-group detection, the transforms a piece applies."""

import os

# numpy's OpenBLAS starts a thread per core at import unless told otherwise: the merge's products run on the
# executor's workers (one per core, convert.plan.ndarrays.single_threaded_blas), and a process about to fork its
# ranks wants no idle pool (launch.local). Set here, before any module of this package imports numpy.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
