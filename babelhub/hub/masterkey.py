"""`babelhub master-key new <file>` and `babelhub master-key rotate --to <file>`: the key that seals the
secrets of connections made over the API (`babelhub.services.secretbox`).

`rotate` reads the same config as `babelhub run` (its master key is the current one), reaches the hub's
NATS (`hub.nats`, or the embedded server of a running `babelhub run`, as the hub's own user), seals every
stored connection's secrets again under the new key, and records one audit event per connection (actor
`cli`). Hubs still on the old key keep serving what they run; the operator then points every hub at the
new key (README "Connections managed at run time").
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from babelhub.errors import ConfigError
from babelhub.services import config as cfg
from babelhub.services.outbox import Refusal
from babelhub.services.secretbox import SealedWrongly, SecretBox, master_keys, read_key, write_key_file

__all__ = ["CLI_ACTOR", "add_commands"]

CLI_ACTOR = "cli"
"""The key id the audit events of the command line name."""


def add_commands(commands: Any, default_config: Path) -> None:
    """Add `master-key new|rotate` to the `babelhub` command line (`commands`: its subparsers)."""
    master = commands.add_parser("master-key", help="make or rotate the key that seals connections' secrets")
    actions = master.add_subparsers(dest="action", required=True)
    new = actions.add_parser("new", help="write a fresh master key to a file (mode 0600; never overwritten)")
    new.add_argument("file", type=Path)
    new.set_defaults(handler=_new)
    rotate = actions.add_parser("rotate", help="seal every stored connection's secrets again under a new key")
    rotate.add_argument("--to", type=Path, required=True, help="the new key's file (`babelhub master-key new`)")
    rotate.add_argument("--config", type=Path, default=None, help=f"TOML config (default: {default_config})")
    rotate.add_argument("--nats", default=None, help="nats://… of the hub's server (default: the config's)")
    rotate.add_argument("--data-dir", default=None, help="embedded nats-server data directory (default .babelhub/)")
    rotate.set_defaults(handler=_rotate, default_config=default_config)


def _new(args: argparse.Namespace) -> int:
    try:
        made = write_key_file(args.file)
    except FileExistsError:
        print(f"babelhub: {args.file} exists; a master key file is never overwritten", file=sys.stderr)
        return 2
    print(f"wrote master key {made} to {args.file} (readable by its owner only).\n"
          f"Give it to the hub as hub.master_key_file = \"{args.file}\" (or BABELHUB_MASTER_KEY_FILE).")
    return 0


def _rotate(args: argparse.Namespace) -> int:
    path = args.config if args.config is not None else (args.default_config if args.default_config.exists() else None)
    try:
        config = cfg.load(path, overrides={"nats": args.nats, "data_dir": args.data_dir})
        _, current = master_keys(config.hub.master_key, config.hub.master_key_file,
                                 config.hub.previous_master_key_file)
        new = read_key(args.to.read_text(), str(args.to))
    except (ConfigError, ValueError, OSError) as exc:
        print(f"babelhub: {exc}", file=sys.stderr)
        return 2
    if not current:
        print("babelhub: the config names no master key (hub.master_key or hub.master_key_file): nothing is "
              "sealed under one yet", file=sys.stderr)
        return 2
    from nats.errors import NoServersError  # NATS loads only for the command that needs it
    from nats.js.errors import NotFoundError

    try:
        changed, sealed_by = asyncio.run(_rotate_stored(config, SecretBox(current), SecretBox([new])))
    except (NoServersError, OSError) as exc:
        print(f"babelhub: cannot reach NATS ({type(exc).__name__}): is `babelhub run` running?", file=sys.stderr)
        return 3
    except NotFoundError:
        print("babelhub: no connections are stored under this subject prefix yet", file=sys.stderr)
        return 0
    except (SealedWrongly, Refusal) as exc:  # those done so far stay done: running it again goes on from there
        print(f"babelhub: {exc}; nothing else was changed", file=sys.stderr)
        return 2
    print(f"sealed the secrets of {changed} connection(s) again under master key {sealed_by}.\n"
          f"Now set hub.master_key_file = \"{args.to}\" on every hub process, with the old key as "
          "hub.previous_master_key_file until all of them run with the new one, and restart them; then run this "
          "again (it re-seals what a hub on the old key wrote meanwhile) and drop hub.previous_master_key_file.")
    return 0


async def _rotate_stored(config: cfg.Config, current: SecretBox, to: SecretBox) -> tuple[int, str]:
    import nats

    from babelhub.services.apikeys import Caller
    from babelhub.services.audit import Audit
    from babelhub.services.broker import Subjects
    from babelhub.services.credentials import hub_user, load_key
    from babelhub.services.managed import ConnectionStore, rotate_all
    from babelhub.services.publisher import Publisher

    settings = config.hub
    subjects = Subjects(settings.subject_prefix, settings.partitions)
    login: dict[str, str] = {}
    url = settings.nats
    if not url:
        user = hub_user(load_key(settings.data_dir))
        url, login = f"nats://127.0.0.1:{settings.nats_port}", {"user": user.user, "password": user.password}
    nc = await nats.connect(url.split(","), allow_reconnect=False, connect_timeout=5, **login)
    try:
        js = nc.jetstream()
        store = ConnectionStore(await js.key_value(subjects.bucket("connections")), current)
        audit = Audit(Publisher(nc, js), js, subjects)
        changed = await rotate_all(store, to)
        actor = Caller(tenant="", scopes=frozenset(), key_id=CLI_ACTOR)
        for record, names in changed:
            await audit.record(actor, record.connection.tenant, "connection.rekey", record.connection.id,
                               {f"secrets.{name}": "(changed)" for name in names})
        return len(changed), to.current
    finally:
        await nc.close()
