"""``python -m tokentrail``: the same as the ``tokentrail`` command."""

from ._cli import main

main()
