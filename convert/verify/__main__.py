"""`python -m convert.verify`."""

import os

# The verifier uses numpy, never its BLAS: OpenBLAS would start a thread per core at import, before --nproc forks.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from convert.verify.run import main  # noqa: E402

if __name__ == "__main__":
    from convert.toplevel import run_program

    run_program(main)
