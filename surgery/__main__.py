"""`python -m surgery ...`: the same command line as the `surgery` console script.

Useful where the console script is not on PATH (a venv not activated, `pip install --user`).
"""

import sys

from surgery.cli import main

if __name__ == "__main__":
    sys.exit(main())
