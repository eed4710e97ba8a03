"""``python -m fastcap.bench``: the ``fastcap bench`` command on its own."""

import argparse
import sys

from fastcap.bench import add_arguments, run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m fastcap.bench", description=run.__doc__)
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
