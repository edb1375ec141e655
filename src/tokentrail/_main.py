"""The ``tokentrail`` command's entry point.

Loading the command takes a moment (aiohttp, boto3); a Ctrl-C or a SIGTERM (a cron job's
timeout) in that moment is the same one line as later, not a traceback from the middle of an
import, nor an end without a word.
"""

from __future__ import annotations

import signal
import sys
import threading

TERMINATED = "terminated (SIGTERM): the run did not finish"


class Terminated(BaseException):
    """SIGTERM arrived (a BaseException, so no ``except Exception`` swallows it)."""


def terminate(signum: int, frame: object) -> None:
    """The SIGTERM handler of the commands that have no graceful stop of their own."""
    raise Terminated


def log_to_stderr() -> None:
    """For the long-running commands (serve, ship): log lines on stderr with their time and
    level, unless the program embedding them set up logging itself."""
    import logging

    if logging.getLogger().handlers:
        return
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for chatty in ("botocore", "boto3", "urllib3", "aiohttp.access"):  # one line a request
        logging.getLogger(chatty).setLevel(logging.WARNING)


def run() -> None:
    """Load the command group and run it."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, terminate)
    try:
        from ._cli import main
    except KeyboardInterrupt:
        sys.stderr.write("tokentrail: error: interrupted\n")
        sys.exit(130)
    except Terminated:
        sys.stderr.write(f"tokentrail: error: {TERMINATED}\n")
        sys.exit(128 + signal.SIGTERM)
    main()
