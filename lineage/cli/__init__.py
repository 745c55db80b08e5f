"""The `lineage` command line (click): one module per command group, shared options in :mod:`.options`.

Every command parses its options, makes one library call and renders the result; ``main`` maps
library errors to one line on stderr and exit code 2.
"""

from lineage.cli.app import cli, main

__all__ = ["cli", "main"]
