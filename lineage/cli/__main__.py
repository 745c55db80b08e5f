"""``python -m lineage.cli``: the same command line as ``lineage``."""

from lineage.cli.app import main

if __name__ == "__main__":  # pragma: no cover
    main()
