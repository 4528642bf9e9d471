"""``python -m gptfast.bench.headline``: the headline run, or one of its stages (``--child``,
how the parent starts each stage in its own process)."""

from . import main

if __name__ == "__main__":
    raise SystemExit(main())
