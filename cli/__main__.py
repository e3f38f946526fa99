"""``python -m cli``: the ``memq`` command line."""

from cli.main import main

main()
