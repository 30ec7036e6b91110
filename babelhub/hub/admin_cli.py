"""`babelhub tenant …` and `babelhub key …`: tenants and API keys managed from the command line.

They read the config `babelhub run` reads and talk to the hub's NATS: `hub.nats`, or the embedded
server of a running `babelhub run` (as the hub's own user, whose password derives from the key in the
data directory). They use the code the admin API uses (`babelhub.services.admin`), so every change is
kept the same way, seen by every hub process at once, and recorded in the audit trail as done by `cli`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from babelhub.errors import ConfigError
from babelhub.services import config as cfg

if TYPE_CHECKING:  # NATS and the services load only when a command runs
    from babelhub.services.admin import Administration

__all__ = ["add_commands", "nats_user_lines", "stored_tenant"]

CONNECT_TIMEOUT_SECONDS = 3.0


class Unreachable(Exception):
    """The hub's NATS cannot be reached, or holds no hub's buckets."""


def add_commands(commands: Any, default_config: Path) -> None:
    """The `tenant` and `key` commands, on the `babelhub` parser's subcommands."""
    tenant = commands.add_parser("tenant", help="make, list and delete tenants (of a running hub)")
    tenant_commands = tenant.add_subparsers(dest="action", required=True)
    create = _with_hub(tenant_commands.add_parser("create", help="make a tenant; prints its NATS user"),
                       default_config)
    create.add_argument("id", help="the tenant's id: 1 to 64 letters, digits, '_' or '-'")
    create.add_argument("--requests-per-second", type=float, default=None, help="its REST rate (default: the hub's)")
    create.add_argument("--burst", type=int, default=None, help="requests it may make at once (default: the hub's)")
    create.add_argument("--retention-days", type=int, default=None,
                        help="days its messages are kept (default: the hub's)")
    create.set_defaults(handler=_run(_tenant_create))
    listing = _with_hub(tenant_commands.add_parser("list", help="print every tenant"), default_config)
    listing.set_defaults(handler=_run(_tenant_list))
    delete = _with_hub(tenant_commands.add_parser("delete", help="delete a tenant made at run time, revoke its keys"),
                       default_config)
    delete.add_argument("id")
    delete.set_defaults(handler=_run(_tenant_delete))

    key = commands.add_parser("key", help="make, list and revoke a tenant's API keys (of a running hub)")
    key_commands = key.add_subparsers(dest="action", required=True)
    make = _with_hub(key_commands.add_parser("create", help="make an API key; prints it (this once)"),
                     default_config)
    make.add_argument("tenant")
    make.add_argument("--scopes", required=True, help="comma-separated: admin, send, read")
    make.add_argument("--name", default="", help="what the key is for")
    make.set_defaults(handler=_run(_key_create))
    keys = _with_hub(key_commands.add_parser("list", help="print a tenant's keys (revoked ones too)"), default_config)
    keys.add_argument("tenant")
    keys.set_defaults(handler=_run(_key_list))
    revoke = _with_hub(key_commands.add_parser("revoke", help="revoke a tenant's key"), default_config)
    revoke.add_argument("tenant")
    revoke.add_argument("key_id", metavar="key-id")
    revoke.set_defaults(handler=_run(_key_revoke))


def _with_hub(parser: argparse.ArgumentParser, default_config: Path) -> argparse.ArgumentParser:
    parser.add_argument("--config", type=Path, default=None, help=f"TOML config (default: {default_config})")
    parser.add_argument("--nats", default=None, help="nats://… of the hub's server (default: the config's, or the "
                        "embedded server of `babelhub run`)")
    parser.add_argument("--data-dir", default=None, help="the hub's data directory (default .babelhub/)")
    parser.set_defaults(default_config=default_config)
    return parser


Command = Callable[[argparse.Namespace, cfg.Config, "Administration"], Awaitable[int]]


def _run(command: Command) -> Callable[[argparse.Namespace], int]:
    """`command` with the config read and an `Administration` on the hub's NATS; errors said plainly."""
    def handler(args: argparse.Namespace) -> int:
        path = args.config if args.config is not None else (
            args.default_config if args.default_config.exists() else None)
        try:
            config = cfg.load(path, overrides={"nats": args.nats, "data_dir": args.data_dir})
        except ConfigError as exc:
            return _fail(str(exc), 2)

        from babelhub.services.outbox import Refusal

        async def session() -> int:
            async with administration(config) as admin:
                return await command(args, config, admin)

        try:
            return asyncio.run(session())
        except Refusal as refusal:
            where = f"{refusal.path}: " if refusal.path.startswith("$") else ""
            return _fail(f"{where}{refusal.message}", 1)
        except Unreachable as exc:
            return _fail(str(exc), 1)

    return handler


@asynccontextmanager
async def administration(config: cfg.Config) -> AsyncIterator[Administration]:
    """An `Administration` of the hub `config` describes, over its NATS."""
    import nats

    from babelhub.hub.link import servers
    from babelhub.services.admin import Administration
    from babelhub.services.apikeys import ApiKeys
    from babelhub.services.audit import Audit
    from babelhub.services.broker import Subjects
    from babelhub.services.publisher import Publisher
    from babelhub.services.tenants import Tenants

    url, login = _nats_of(config)
    try:
        # (nats-py may keep trying a refused server although told not to reconnect: bounded here.)
        nc = await asyncio.wait_for(nats.connect(
            servers(url), name="babelhub-cli", allow_reconnect=False, max_reconnect_attempts=0,
            connect_timeout=CONNECT_TIMEOUT_SECONDS, error_cb=_quiet, **login), 2 * CONNECT_TIMEOUT_SECONDS)
    except (nats.errors.Error, OSError, TimeoutError) as exc:
        raise Unreachable(f"cannot reach the hub's NATS at {_shown(url)} ({type(exc).__name__}): "
                          "is `babelhub run` running?") from None
    try:
        js, subjects = nc.jetstream(), Subjects(config.hub.subject_prefix, config.hub.partitions)
        try:
            tenants_kv, keys_kv = (await js.key_value(subjects.bucket("tenants")),
                                   await js.key_value(subjects.bucket("keys")))
        except nats.js.errors.NotFoundError:
            raise Unreachable(f"NATS at {_shown(url)} holds no babelhub buckets of prefix "
                              f"{subjects.prefix!r}: start `babelhub run` once first") from None
        tenants = Tenants(tenants_kv, config.tenants)
        await tenants.load()
        keys = ApiKeys(keys_kv, [(tenant.id, key) for tenant in config.tenants for key in tenant.api_keys])
        yield Administration(tenants, keys, Audit(Publisher(nc, js), js, subjects))
    finally:
        await nc.drain()


async def _quiet(_: Exception) -> None:
    """nats-py logs every failed attempt with a traceback; the command says what failed in one line."""


def _nats_of(config: cfg.Config) -> tuple[str, dict[str, str]]:
    """Where the hub's NATS is, and the login: the embedded server's takes the hub's own user."""
    from babelhub.services.credentials import hub_user, load_key

    if config.hub.nats:
        return config.hub.nats, {}
    user = hub_user(load_key(config.hub.data_dir))
    return f"nats://127.0.0.1:{config.hub.nats_port}", {"user": user.user, "password": user.password}


def _shown(url: str) -> str:
    """NATS URLs as they may be printed: without users and passwords."""
    from babelhub.hub.cli import _without_userinfo

    return _without_userinfo(url)


def _fail(message: str, code: int) -> int:
    print(f"babelhub: {message}", file=sys.stderr)
    return code


# ------------------------------------------------------------------------------------ commands

async def _tenant_create(args: argparse.Namespace, config: cfg.Config, admin: Administration) -> int:
    from babelhub.services.admin import CLI_CALLER
    from babelhub.services.rest import decode
    from babelhub.services.tenants import NewTenant

    given = {"id": args.id, "requests_per_second": args.requests_per_second, "burst": args.burst,
             "retention_days": args.retention_days}
    new = decode(msgspec.json.encode({name: value for name, value in given.items() if value is not None}), NewTenant)
    record = await admin.create_tenant(CLI_CALLER, new)
    print(f"tenant {record.id} created")
    print("\n".join(nats_user_lines(config, record.id)))
    return 0


async def _tenant_list(args: argparse.Namespace, config: cfg.Config, admin: Administration) -> int:
    for record in admin.tenants.records():
        limits = [f"{name}={value}" for name in ("requests_per_second", "burst", "retention_days")
                  if (value := getattr(record, name)) is not None]
        origin = f"made {record.created_at}" if record.managed else "config file"
        print("  ".join([record.id, origin, *limits]))
    return 0


async def _tenant_delete(args: argparse.Namespace, config: cfg.Config, admin: Administration) -> int:
    from babelhub.services.admin import CLI_CALLER

    revoked = await admin.delete_tenant(CLI_CALLER, args.id)
    print(f"tenant {args.id} deleted; keys revoked: {', '.join(revoked) or 'none'}")
    print("Its stored messages and raw records are erased by retention (hub.retention_days).")
    return 0


async def _key_create(args: argparse.Namespace, config: cfg.Config, admin: Administration) -> int:
    from babelhub.services.admin import CLI_CALLER, NewKey
    from babelhub.services.rest import decode

    scopes = [scope.strip() for scope in args.scopes.split(",") if scope.strip()]
    new = decode(msgspec.json.encode({"scopes": scopes, "name": args.name}), NewKey)
    record, key = await admin.create_key(CLI_CALLER, args.tenant, new)
    print(f"key {record.id} of tenant {record.tenant}, scopes {','.join(record.scopes)} (shown this once):")
    print(key)
    return 0


async def _key_list(args: argparse.Namespace, config: cfg.Config, admin: Administration) -> int:
    for record in await admin.list_keys(args.tenant):
        state = f"revoked {record.revoked_at}" if record.revoked_at else "active"
        print("  ".join([record.id, ",".join(record.scopes), f"made {record.created_at}", state, record.name]).rstrip())
    return 0


async def _key_revoke(args: argparse.Namespace, config: cfg.Config, admin: Administration) -> int:
    from babelhub.services.admin import CLI_CALLER

    record = await admin.revoke_key(CLI_CALLER, args.tenant, args.key_id)
    print(f"key {record.id} of tenant {record.tenant} revoked")
    return 0


# ------------------------------------------------------------------------------------ NATS users

def nats_user_lines(config: cfg.Config, tenant: str) -> list[str]:
    """What `babelhub credentials <tenant>` prints: the NATS user of the tenant's processors."""
    from babelhub.services.broker import Subjects
    from babelhub.services.credentials import load_key, tenant_user

    user = tenant_user(load_key(config.hub.data_dir), Subjects(config.hub.subject_prefix), tenant)
    url = _shown(config.hub.nats) if config.hub.nats else f"nats://127.0.0.1:{config.hub.nats_port}"
    admitted = ("The running hub's embedded server admits it as soon as the tenant exists." if not config.hub.nats
                else "Add it to your NATS server's users (`babelhub credentials --server-config <tenant>`).")
    return [
        f"NATS user for the processors of tenant {tenant} (key in {config.hub.data_dir})",
        f"  url           {url}",
        f"  user          {user.user}",
        f"  password      {user.password}",
        f"  inbox_prefix  {user.inbox_prefix}",
        f"  publish       {', '.join(user.publish)}",
        f"  subscribe     {', '.join(user.subscribe)}",
        f"Python: await nats.connect({url!r}, user={user.user!r}, password={user.password!r}, "
        f"inbox_prefix={user.inbox_prefix!r})",
        admitted,
    ]


def stored_tenant(config: cfg.Config, tenant: str) -> bool:
    """Whether the running hub knows `tenant` (made at run time); `Unreachable` when it cannot be asked."""
    async def known() -> bool:
        async with administration(config) as admin:
            return bool(await admin.tenants.fetch(tenant))

    return asyncio.run(known())
