"""``python -m fastcap``: the command line (see :mod:`fastcap.cli`)."""
import sys

from fastcap.cli import main

sys.exit(main())
