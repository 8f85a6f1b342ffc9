"""The ``vdopt`` command: one subcommand per module in ``vdopt.cli``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Each module defines ``register(subparsers)``, which adds its parser and sets ``func``.
COMMANDS = ("demo", "inspect", "compile", "bench")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vdopt", description="Inference compiler for video diffusion transformers")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what vdopt does")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"vdopt.cli.{name}").register(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
