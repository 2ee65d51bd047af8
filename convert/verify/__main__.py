"""`python -m convert.verify`."""

from convert.verify.run import main

if __name__ == "__main__":
    main()
