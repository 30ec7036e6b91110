"""The `babelhub` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from babelhub import canonical


def _schema(_: argparse.Namespace) -> int:
    json.dump(canonical.schema(), sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="babelhub", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    schema = commands.add_parser("schema", help="print the JSON Schema (draft 2020-12) of the envelope")
    schema.set_defaults(handler=_schema)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = args.handler
    result: int = handler(args)
    return result
