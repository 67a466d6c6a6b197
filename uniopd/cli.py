"""`uniopd` command line: parses, then dispatches to one module per command (`uniopd.commands`)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from uniopd.config import ConfigError

COMMANDS = ("train", "eval", "demo", "balance", "generate", "sft", "prepare", "config")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="uniopd", description="On-policy distillation with the Uni-OPD recipe")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"uniopd.commands.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    from uniopd.data.validate import RecordError
    from uniopd.models.loading import ModelLoadError, VocabularyMismatch

    try:
        return args.run(args)
    except (ConfigError, RecordError, ModelLoadError, VocabularyMismatch, FileNotFoundError, ValueError) as exc:
        print(f"uniopd {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
