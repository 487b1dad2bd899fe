"""Subcommands of the ``pnn`` command line, one module each (see pnn/cli.py)."""
