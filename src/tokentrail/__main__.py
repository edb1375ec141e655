"""``python -m tokentrail``: the same as the ``tokentrail`` command."""

from ._main import run

run()
