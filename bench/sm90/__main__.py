"""``python -m gptfast.bench.sm90``: the sm_90 report's command line (:func:`.cli.main`)."""

import sys

from .cli import main


if __name__ == "__main__":
    sys.exit(main())
