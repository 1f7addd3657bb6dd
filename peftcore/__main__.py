"""``python -m peftcore``: the ``peftcore`` command line."""

from peftcore.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
