"""`python -m convert.inspect`."""

from convert.inspect.report import main

if __name__ == "__main__":
    main()
