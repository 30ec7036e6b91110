"""The `babelhub` command line: `babelhub run` starts the hub, `babelhub schema` prints the JSON Schema
(`--frames`: those of the client-session frames; `--processor-frames`: those of the processor WebSocket),
`babelhub credentials <tenant>` prints the NATS user a tenant's processors connect to the embedded server with,
`babelhub tenant …` and `babelhub key …` manage tenants and API keys (`babelhub.hub.admin_cli`),
`babelhub master-key new|rotate` makes or rotates the key sealing connections' secrets (`masterkey.py`)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import signal
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from babelhub import canonical
from babelhub.errors import ConfigError
from babelhub.hub import masterkey
from babelhub.hub.admin_cli import add_commands
from babelhub.services import config as cfg

if TYPE_CHECKING:  # the hub's imports (NATS, aiohttp, actors) load only when `run` needs them
    from babelhub.hub.app import Hub

DEFAULT_CONFIG = Path("configs/default.toml")


def _schema(args: argparse.Namespace) -> int:
    if args.processor_frames:
        from babelhub.processors.websocket_frames import schemas as processor_schemas

        json.dump(processor_schemas(), sys.stdout, indent=2, sort_keys=True)
    elif args.frames:
        from babelhub.sessions.frames import schemas

        json.dump(schemas(), sys.stdout, indent=2, sort_keys=True)
    else:
        json.dump(canonical.schema(), sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
    return 0


def _config_path(args: argparse.Namespace) -> Path | None:
    return args.config if args.config is not None else (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)


def _credentials(args: argparse.Namespace) -> int:
    from babelhub.hub.admin_cli import Unreachable, nats_user_lines, stored_tenant
    from babelhub.services.broker import Subjects
    from babelhub.services.credentials import load_key, tenant_user, user_entry

    path = _config_path(args)
    try:
        config = cfg.load(path, overrides={"data_dir": args.data_dir})
    except ConfigError as exc:
        print(f"babelhub: {exc}", file=sys.stderr)
        return 2
    if args.tenant not in {tenant.id for tenant in config.tenants}:
        try:
            known = stored_tenant(config, args.tenant)
        except Unreachable as exc:
            known = False
            print(f"babelhub: {exc}", file=sys.stderr)
        if not known:
            print(f"babelhub: no tenant {args.tenant!r} in {path or 'the built-in config'} or made at run time",
                  file=sys.stderr)
            return 2
    if args.server_config:
        user = tenant_user(load_key(config.hub.data_dir), Subjects(config.hub.subject_prefix), args.tenant)
        print(json.dumps(user_entry(user), indent=2))
        return 0
    print("\n".join(nats_user_lines(config, args.tenant)))
    return 0


GC_THRESHOLDS = (100_000, 20, 100)
"""The cyclic collector's thresholds in a running hub (`gc.set_threshold`)."""


def _run(args: argparse.Namespace) -> int:
    path = _config_path(args)
    try:
        config = cfg.load(path, overrides={"http": args.http, "nats": args.nats, "data_dir": args.data_dir})
    except ConfigError as exc:
        print(f"babelhub: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.hub.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is not built for every platform
        return asyncio.run(_serve(config, path))
    return uvloop.run(_serve(config, path))


async def _serve(config: cfg.Config, path: Path | None) -> int:
    from babelhub.hub.app import Hub

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with Hub(config) as hub:
            # What start-up built (modules, codecs, config, connections) lives as long as the process:
            # moved out of the collector's sight, so no later full collection walks it again.
            gc.freeze()
            # The collector's default pace (a young collection every 700 net allocations, each tenth an
            # older one) spent ~30% of a busy hub's CPU walking messages held in flight, and found almost
            # no cycles (bench/e2e_bench.py b: 3.7 → 2.8 ms of CPU per message). Reference counting
            # frees nearly everything; the collector only has to catch the odd cycle.
            gc.set_threshold(*GC_THRESHOLDS)
            print(_banner(hub, path), flush=True)
            await _first_of(stop.wait(), hub.nats_lost.wait())
            print("babelhub: shutting down…", flush=True)
    except ConfigError as exc:
        print(f"babelhub: {exc}", file=sys.stderr)
        return 2
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
    if hub.nats_lost.is_set():
        # Never a zombie: a hub that cannot reach NATS any more exits non-zero so its supervisor restarts it.
        print("babelhub: the NATS connection is lost for good; exiting", file=sys.stderr)
        return 3
    return 0


async def _first_of(*waits: Coroutine[Any, Any, Any]) -> None:
    """Wait until any of `waits` finishes; cancel the others."""
    tasks = [asyncio.ensure_future(wait) for wait in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


def _banner(hub: Hub, path: Path | None) -> str:
    nats_kind = f"embedded nats-server, data in {hub.config.hub.data_dir}" if hub.server else "external"
    lines = [
        "babelhub is running",
        f"  config      {path or '(built-in defaults)'}",
        f"  http        {hub.http_url}   (web chat at {hub.http_url}/)",
        f"  nats        {_without_userinfo(hub.nats_url)}   ({nats_kind})",
        f"  subjects    {hub.subjects.prefix}.<tenant>.in.>  /  .out.<conversation>  /  .status.>",
        f"  metrics     {hub.http_url}/metrics   health {hub.http_url}/healthz  {hub.http_url}/readyz",
    ]
    if hub.server is not None:
        lines.append("  processors  `babelhub credentials <tenant>` prints the NATS user of a tenant's processors")
    addresses = hub.addresses()
    for connection in hub.config.connections:
        where = addresses[connection.id]
        lines.append(f"  connection  {connection.id} ({connection.channel}, tenant {connection.tenant}): {where}")
    lines.append("Ctrl-C stops it.")
    return "\n".join(lines)


def _without_userinfo(url: str) -> str:
    """NATS URLs (one, or a cluster's, comma-separated) as they may be shown: without users and passwords."""
    shown = []
    for server in url.split(","):
        parts = urlsplit(server.strip())
        shown.append(parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl())
    return ",".join(shown)


def _channels(_: argparse.Namespace) -> int:
    from babelhub.codecs.support import markdown_table

    print(markdown_table())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="babelhub", description="One canonical message format for every channel.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="start the hub")
    run.add_argument("--config", type=Path, default=None, help=f"TOML config (default: {DEFAULT_CONFIG})")
    run.add_argument("--http", default=None, help="host:port to serve HTTP on (default 127.0.0.1:8080)")
    run.add_argument("--nats", default=None, help="nats://… of an existing server, or several of one cluster "
                     "comma-separated (default: embedded)")
    run.add_argument("--data-dir", default=None, help="embedded nats-server data directory (default .babelhub/)")
    run.set_defaults(handler=_run)
    schema = commands.add_parser("schema", help="print the JSON Schema (draft 2020-12) of the envelope")
    schema.add_argument("--frames", action="store_true",
                        help="print the client-session frames' schemas instead: one per frame type, keyed "
                             "client.<type> / hub.<type>")
    schema.add_argument("--processor-frames", action="store_true",
                        help="print the frames' schemas of processors on WebSocket (/ws/processor) instead: one "
                             "per frame type, keyed app.<type> / hub.<type>")
    schema.set_defaults(handler=_schema)
    credentials = commands.add_parser(
        "credentials", help="print the NATS user of a tenant's processors (embedded server)")
    credentials.add_argument("tenant", help="tenant id from the config")
    credentials.add_argument("--config", type=Path, default=None, help=f"TOML config (default: {DEFAULT_CONFIG})")
    credentials.add_argument("--data-dir", default=None,
                             help="embedded nats-server data directory (default .babelhub/)")
    credentials.add_argument("--server-config", action="store_true",
                             help="print the user's nats-server `authorization.users` entry instead")
    credentials.set_defaults(handler=_credentials)
    add_commands(commands, DEFAULT_CONFIG)
    channels = commands.add_parser("channels", help="print the channel tables (markdown): parts and settings")
    channels.set_defaults(handler=_channels)
    masterkey.add_commands(commands, DEFAULT_CONFIG)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.handler(args)
    return result
