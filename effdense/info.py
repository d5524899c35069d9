"""``python -m effdense.info``: the command's name, kept; the tool is :mod:`effdense.tools.info`."""
import sys

from .tools.info import main

if __name__ == "__main__":
    sys.exit(main())
