"""Subcommands of the ``vdopt`` CLI (one module each, registered in ``vdopt.cli``)."""
