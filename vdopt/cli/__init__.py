"""The ``vdopt`` command: one subcommand per module in ``vdopt.cli``.

A failure prints one line, ``vdopt: error: <what went wrong>``, and exits with status 1;
``-v`` adds the traceback (and vdopt's INFO logs). Under torchrun every rank runs this
command: a failure every rank meets alike (a user mistake such as a mesh that does not fit
the world size, or a model that cannot be captured) is reported by rank 0 only; any other
failure may be one rank's own, so each failing rank reports it, named ``rank N``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback

# Each module defines ``register(subparsers)``, which adds its parser and sets ``func``.
COMMANDS = ("demo", "generate", "inspect", "compile", "bench", "gpu_check", "plan", "calibrate")

EXIT_FAILURE = 1
"""Exit status of a command that failed (argparse's usage errors keep their status 2)."""


class CommandError(Exception):
    """A failure the command has already described in full: its message is the report."""


MAX_INTERNAL_MESSAGE = 300
"""Characters of an unexpected error's message on the one line (``-v`` shows it whole)."""


def error_line(error: BaseException, *, verbose: bool = False) -> str:
    """One line that says what failed.

    A user mistake (``ValueError``/``TypeError``) and a ``CommandError`` are worded for the
    user: their message is the line. Anything else is unexpected: its type, the start of
    its message (torch's can be pages long) and where to get the rest.
    """
    text = " ".join(str(error).split())  # multi-line messages fold into one line
    if isinstance(error, (ValueError, TypeError, CommandError)) and text:
        return text
    if len(text) > MAX_INTERNAL_MESSAGE:
        text = text[:MAX_INTERNAL_MESSAGE] + " ..."
    name = type(error).__name__
    line = f"{name}: {text}" if text else name
    return line if verbose else line + " (run with -v for the traceback)"


def _rank() -> int:
    """This process's rank under torchrun (0 without it)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _same_on_every_rank(error: BaseException) -> bool:
    """A failure every rank meets alike: a user mistake (``ValueError``/``TypeError``, which
    includes ``ArtifactError``), or a model torch.export cannot capture (``CaptureError``:
    every rank captures the same model with the same inputs)."""
    if isinstance(error, (ValueError, TypeError)):
        return True
    capture = sys.modules.get("vdopt.capture")  # loaded if capturing is what failed
    return capture is not None and isinstance(error, capture.CaptureError)


def report_failure(error: BaseException, verbose: bool) -> None:
    """Print the one-line report of ``error`` (and its traceback with ``-v``) to stderr."""
    rank = _rank()
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if rank != 0 and _same_on_every_rank(error) and not verbose:
        return  # rank 0 reports it: every rank checked the same arguments, model and inputs
    if verbose:
        traceback.print_exception(error, file=sys.stderr)
    where = f" (rank {rank})" if world > 1 and rank != 0 else ""
    print(f"vdopt: error{where}: {error_line(error, verbose=verbose)}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vdopt", description="Inference compiler for video diffusion transformers")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log what vdopt does and show the full traceback of a failure")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"vdopt.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Progress lines stand in for bars when stderr is not a terminal: show them without -v too.
    logging.getLogger("vdopt.progress").setLevel(logging.INFO)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("vdopt: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001  the command line reports every failure the same way
        report_failure(error, args.verbose)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
