"""`python -m convert.inspect`."""

import sys

from convert.inspect.report import main

if __name__ == "__main__":
    sys.exit(main())
