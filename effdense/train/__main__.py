"""``python -m effdense.train``: the ``effdense-train`` command."""
import sys

from .run import main

sys.exit(main())
