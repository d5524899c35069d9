"""``python -m effdense.demo``: the command's name, kept; the tool is :mod:`effdense.tools.demo`."""
import sys

from .tools.demo import main

if __name__ == "__main__":
    sys.exit(main())
