"""`uniopd config`: every config key with its default and help, or a resolved config."""

from __future__ import annotations

import argparse

from uniopd.commands.common import add_config_args
from uniopd.config import field_help, load_config


def add_parser(sub) -> None:
    p = sub.add_parser("config", help="print every config key with its default and help, or a resolved config")
    add_config_args(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.config or args.overrides:
        import yaml

        from uniopd.config import to_dict

        print(yaml.safe_dump(to_dict(load_config(args.config, list(args.overrides))), sort_keys=False))
        return 0
    for key, default, help_text in field_help():
        print(f"{key:36s} {default:14s} {help_text}")
    return 0
