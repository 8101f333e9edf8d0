"""`python -m usi_cache.cli ...`: the same as `usi ...`."""
import sys

from usi_cache.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
