"""`uniopd` command line: parses, then dispatches to one module per command (`uniopd.commands`)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from uniopd.config import ConfigError

COMMANDS = ("train", "eval", "demo", "ablate", "balance", "generate", "sft", "prepare", "config", "serve-teacher",
            "cache-teacher", "report", "export")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="uniopd", description="On-policy distillation with the Uni-OPD recipe")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"uniopd.commands.{name.replace('-', '_')}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    from uniopd.data.validate import RecordError
    from uniopd.models.loading import ModelLoadError, VocabularyMismatch
    from uniopd.rollout.base import EngineFailed
    from uniopd.teachers.base import TeacherServiceError
    from uniopd.train.checkpoint import CheckpointError

    try:
        return args.run(args)
    # OSError: the disk is full, the run directory read-only, a path is not what it should be:
    # the user's environment, not a bug, so one line naming the path (the traceback with -v).
    except (ConfigError, RecordError, ModelLoadError, VocabularyMismatch, FileNotFoundError, ValueError,
            OSError, TeacherServiceError, CheckpointError, EngineFailed) as exc:
        logging.getLogger("uniopd").debug("traceback of the error below", exc_info=True)
        print(f"uniopd {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
