"""Subcommands of the ``pnn`` command line, one module each.

Each module defines ``add_parser(subparsers)``, which registers its subcommand with a ``func``
default taking the parsed arguments and returning an exit code. Modules import their heavy
dependencies inside the handler, so ``pnn --help`` stays fast.
"""
