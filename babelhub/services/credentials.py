"""NATS users for the embedded nats-server: the hub's own, and one per tenant for its processors.

Passwords are derived (HMAC-SHA256) from one random key kept in the data directory (`nats-auth.key`,
file mode 0600), so `babelhub credentials <tenant>` prints the same password the running hub gave the
server, without the two ever writing the same file. A tenant's user may only publish its replies
(`<prefix>.<tenant>.out.>`) and injections (`<prefix>.<tenant>.inject.>`) and read its own messages
and statuses (`<prefix>.<tenant>.in.>`, `<prefix>.<tenant>.status.>`) plus its own inbox prefix
(`_INBOX.<tenant>.>`, for request/reply such as JetStream publish acknowledgements): no other
tenant's subjects, no JetStream API. It also takes the requests of its request-mode processors
(`<prefix>.<tenant>.requests.>`) and may answer each request it received (the server's
`allow_responses`: one reply, to that request's reply subject only). Deleting the key file and
restarting the hub changes every password.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Sequence
from pathlib import Path

import msgspec

from babelhub.services.broker import Subjects

__all__ = ["HUB_USER", "NatsUser", "hub_user", "load_key", "server_config", "tenant_user"]

HUB_USER = "babelhub"
KEY_FILE = "nats-auth.key"


class NatsUser(msgspec.Struct, frozen=True, kw_only=True):
    """One user of the embedded server; empty permission lists mean "everything" (the hub's own)."""

    user: str
    password: str
    inbox_prefix: str = "_INBOX"
    publish: list[str] = []
    subscribe: list[str] = []


def load_key(data_dir: str | Path) -> bytes:
    """The data directory's credentials key, made on first use (readable by its owner only)."""
    path = Path(data_dir) / KEY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        os.chmod(path, 0o600)
        return path.read_bytes().strip()
    with os.fdopen(descriptor, "wb") as file:
        file.write(secrets.token_hex(32).encode())
    return path.read_bytes().strip()


def _password(key: bytes, who: str) -> str:
    digest = hmac.new(key, who.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def hub_user(key: bytes) -> NatsUser:
    return NatsUser(user=HUB_USER, password=_password(key, "hub"))


def tenant_user(key: bytes, subjects: Subjects, tenant: str) -> NatsUser:
    p = subjects.prefix
    inbox = f"_INBOX.{tenant}"
    return NatsUser(
        user=f"tenant-{tenant}",
        password=_password(key, f"tenant:{tenant}"),
        inbox_prefix=inbox,
        # Audio services hear the tenant's calls and their events, and play into and steer them; the
        # callers' audio and the events are the hub's to publish.
        # Its services may inject canonical envelopes for its own connections (the `inject` source).
        publish=[f"{p}.{tenant}.out.>", f"{p}.{tenant}.inject.>", f"{p}.{tenant}.audio.*.down",
                 f"{p}.{tenant}.audio.*.control"],
        subscribe=[f"{p}.{tenant}.in.>", f"{p}.{tenant}.status.>", f"{inbox}.>", f"{p}.{tenant}.audio.*.up",
                   f"{p}.{tenant}.audio.*.events", f"{p}.{tenant}.requests.>"],
    )


def user_entry(user: NatsUser) -> dict[str, object]:
    """One entry of a nats-server `authorization.users` list."""
    entry: dict[str, object] = {"user": user.user, "password": user.password}
    if user.publish or user.subscribe:
        entry["permissions"] = {"publish": {"allow": user.publish}, "subscribe": {"allow": user.subscribe},
                                # One reply per request received (request-mode processors answer so).
                                "allow_responses": True}
    return entry


def server_config(users: Sequence[NatsUser]) -> str:
    """A nats-server configuration (its format reads JSON) that admits exactly `users`."""
    return json.dumps({"authorization": {"users": [user_entry(user) for user in users]}}, indent=2)

