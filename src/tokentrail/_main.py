"""The ``tokentrail`` command's entry point.

Loading the command takes a moment (aiohttp, boto3); a Ctrl-C in that moment is the same one
line as a Ctrl-C later, not a traceback from the middle of an import.
"""

from __future__ import annotations

import sys


def run() -> None:
    """Load the command group and run it."""
    try:
        from ._cli import main
    except KeyboardInterrupt:
        sys.stderr.write("tokentrail: error: interrupted\n")
        sys.exit(130)
    main()
