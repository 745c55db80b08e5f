"""``python -m lineage``: the same command line as ``lineage``."""

from lineage.cli import main

if __name__ == "__main__":  # pragma: no cover
    main()
