"""``python -m quelay.cli``: the same as the ``quelay`` command."""

from .app import main

main()
