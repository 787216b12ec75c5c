"""``python -m tntsearch.export``: see :mod:`tntsearch.export.command`."""
import sys

from tntsearch.export.command import main

sys.exit(main())
