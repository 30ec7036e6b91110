"""The hub's configuration: a TOML file, then `BABELHUB_*` environment variables, then command-line flags.

Every table is a msgspec Struct that forbids unknown keys, so a typo is an error naming its path
(`unknown field 'htp' at $.hub`) instead of a silently ignored setting.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec

from babelhub import codecs
from babelhub.canonical import PART_TYPES
from babelhub.codecs.settings import Settings, SettingsError, read_settings
from babelhub.entrypoints import installed, load_class
from babelhub.errors import ConfigError
from babelhub.media.channel import is_media_channel, media_channel

__all__ = ["HUB_TENANT", "SOURCES", "TRANSPORTS", "Config", "Connection", "Failover", "HubSettings", "Processor",
           "Route", "Tenant", "channel_codec", "check_connection", "load"]

TRANSPORTS = "babelhub.transports"
"""The entry-point group of processor transports (`babelhub.plugins.ProcessorTransport`)."""
SOURCES = "babelhub.sources"
"""The entry-point group of inbound sources (`babelhub.plugins.InboundSource`)."""

MAX_REPLICAS = 5
MAX_PARTITIONS = 1024
"""The most copies JetStream keeps of a stream."""

HUB_TENANT = "_hub"
"""Reserved: the tenant the operator's audit events are kept under (`babelhub.services.audit`)."""

# Ids become NATS subject tokens and URL path segments: keep them to a safe alphabet.
_ID = r"^[A-Za-z0-9_-]{1,64}$"


class _Table(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class HubSettings(_Table, frozen=True, kw_only=True):
    http: str = "127.0.0.1:8080"
    """host:port the HTTP server (webhooks, REST, WebSocket, web chat) listens on."""
    body_timeout_seconds: float = 10.0
    """A request body not fully received this long after its headers is answered 408 and its connection
    closed, so a client that stalls mid-body cannot hold a handler."""
    max_frame_bytes: int = 64 * 1024
    """Largest web chat WebSocket frame; a larger one closes the socket with 1009 and is never recorded.
    Must stay well below the NATS server's max_payload (checked at start)."""
    max_sockets_per_ip: int = 20
    """Web chat WebSockets one client address may hold open in this process; more close with 1008."""
    session_frame_rate: float = 5.0
    """Frames per second one web chat session may send, after a burst of `session_frame_burst`; a
    session that sends faster is closed with 1008."""
    session_frame_burst: int = 20
    media_max_frame_bytes: int = 64 * 1024
    """Largest frame a telephony provider may send on `/media/{connection}`; a larger one closes the
    socket with 1009."""
    media_frame_rate: float = 150.0
    """Frames per second one media socket may send after a burst of `media_frame_burst` (providers send
    50 a second of 20 ms audio); a faster one is closed with 1008."""
    media_frame_burst: int = 300
    media_queue_seconds: float = 10.0
    """Seconds of audio a call's outbound queue holds before the oldest frame is dropped (counted in
    `babelhub_audio_frames_dropped_total`)."""
    nats: str = ""
    """nats://… of an existing server or cluster; empty = start the embedded nats-server."""
    replicas: int = 1
    """Copies JetStream keeps of every stream and KV bucket the hub makes (1 to 5), each on another server
    of the NATS cluster; more than the cluster has up is refused at start. Existing ones with fewer are
    raised to it."""
    partitions: int = 16
    """Conversations hash into this many partitions, each handled by one hub process at a time (1 to
    1024). Fixed when the streams are made: every hub sharing them must say the same."""
    lease_seconds: float = 6.0
    """How long a hub's hold on its partitions outlives its last renewal: a hub that dies without
    stopping (kill -9, a lost machine) has its partitions taken over by the others after about this
    long and a quarter more."""
    nats_port: int = 4222
    """Port of the embedded nats-server on 127.0.0.1 (0 = any free port)."""
    data_dir: str = ".babelhub"
    """Where the embedded nats-server keeps JetStream data."""
    subject_prefix: str = "bh"
    max_body_bytes: int = 512 * 1024
    """Largest webhook body accepted; larger ones are answered 413. With the request's headers it must
    fit in the NATS server's max_payload (1 MiB by default), which is checked at start."""
    nats_max_reconnect_attempts: int = -1
    """Tries to reconnect to NATS after losing it; -1 = forever. When they are used up the hub stops
    and `babelhub run` exits non-zero, for a supervisor to restart it."""
    dedup_window_seconds: float = 600.0
    """How long JetStream remembers a webhook's dedup key (channel retries inside it are absorbed)."""
    ack_wait_seconds: float = 30.0
    """How long a record may go without a sign of life before JetStream redelivers it. The hub marks
    what it holds as in progress every third of this; after a crash, what was in flight is processed
    again this long after its last mark (duplicates are absorbed)."""
    idle_seconds: float = 900.0
    """A conversation actor idle this long is snapshotted and stopped (by a sweep that runs every 30 s at
    most, or every quarter of this, whichever is sooner)."""
    max_active_actors: int = 10_000
    mailbox_size: int = 256
    send_deadline_seconds: float = 86_400.0
    """While a channel keeps failing (5xx, 429, network errors, timeouts), an outbound message waits
    this long from when the hub stored it; then it is `failed`. A refusal (4xx) fails it at once."""
    circuit_max_backoff_seconds: float = 30.0
    call_timeout_seconds: float = 30.0
    """A channel API call unanswered this long is given up: its outcome is then unknown (ambiguous), and
    it is reconciled rather than made again (README "Delivery guarantees")."""
    """Longest pause between two probes of a failing channel (the pauses double from half a second)."""
    operator_key: str = ""
    """The key that manages tenants and their keys over the admin API (`BABELHUB_OPERATOR_KEY`); empty:
    tenants are managed with the `babelhub tenant` and `babelhub key` commands only."""
    master_key: str = ""
    """The key (32 bytes, URL-safe base64) that encrypts the secrets of connections made over the API
    (`BABELHUB_MASTER_KEY`); or `master_key_file`."""
    master_key_file: str = ""
    """A file holding the master key (made by `babelhub master-key new`)."""
    previous_master_key_file: str = ""
    """During a master key rotation: the key file used before, so secrets still sealed under it open
    (README "Connections managed at run time")."""
    allow_private_api_base: bool = False
    """Whether a connection made over the API may point its `api_base` at a private, loopback or
    link-local address (`babelhub.services.addresses`)."""
    requests_per_second: float = 50.0
    """Each tenant's REST requests per second (per hub process), unless the tenant says otherwise."""
    request_burst: int = 100
    retention_days: int = 7
    """Days messages and raw records are kept, unless the tenant says otherwise."""
    directory_cache_seconds: float = 60.0
    """How long a channel's directory (its chats, contacts, channels) is cached."""
    log_level: str = "info"
    tracing: Literal["propagate", "console"] = "propagate"
    """OpenTelemetry: `propagate` carries the W3C trace context end to end without recording spans;
    `console` also records spans and prints them."""


class Tenant(_Table, frozen=True, kw_only=True):
    id: str
    api_keys: list[str] = []
    """Keys with every scope of this tenant (README "Tenants and API keys"); more are made at run time."""
    requests_per_second: float | None = None
    """This tenant's REST rate limit; unset: `hub.requests_per_second`."""
    burst: int | None = None
    """Requests this tenant may make at once above its rate; unset: `hub.request_burst`."""
    retention_days: int | None = None
    """Days this tenant's messages and raw records are kept; unset: `hub.retention_days`."""


class Failover(_Table, frozen=True, kw_only=True):
    """Where a message goes when this connection does not deliver it in time (README "Failover")."""

    to: str
    """Another connection of the same tenant: the copy is sent through it."""
    after_seconds: float
    """A message not `delivered` (or later) this long after it was sent is sent again via `to`."""


class Connection(_Table, frozen=True, kw_only=True):
    id: str
    tenant: str
    channel: str
    mode: str = ""
    """The inbound source its traffic comes through: `webhook` (the channel calls the hub), `polling` (the
    hub polls the channel: Telegram getUpdates), `websocket` (clients connect to the hub: the web
    chat); empty = the channel's own default."""
    api_base: str = ""
    """Overrides the channel API's base URL (a proxy, a regional endpoint, a local fake in tests)."""
    secrets: dict[str, str] = {}
    """Credentials, named by the channel's codec (`Codec.secret_settings`); checked by `load`."""
    options: dict[str, Any] = {}
    """Channel options (`Codec.option_settings`, `public_url` on every channel); checked by `load`."""
    max_rate: float | None = None
    """API calls per second on this connection; unset = the channel's documented rate (`babelhub
    channels` lists it), 0 = unpaced. A 429's Retry-After pauses the connection either way."""
    send_deadline_seconds: float | None = None
    """This connection's `hub.send_deadline_seconds`; unset = the hub's."""
    identities: list[str] = []
    """The native ids this connection's own account has when it writes in a chat (a WhatsApp business
    number's `wa_id`, a bot's user id): a message a connection of the same tenant and channel receives
    from one of them is the hub hearing itself, and is not handed to processors (README "Loop prevention")."""
    failover: Failover | None = None
    """Send a copy of a message through another connection when this one has not delivered it in time,
    or failed it; unset = never."""


EnvelopeKind = Literal["message", "activity"]


class Route(_Table, frozen=True, kw_only=True):
    """One routing rule of a processor: an inbound envelope matches when it matches every field given
    (an empty list matches anything)."""

    connections: list[str] = []
    channels: list[str] = []
    conversation_types: list[str] = []
    """`direct`, `group`, `channel`, `thread` (`canonical.Conversation.type`)."""
    kinds: list[EnvelopeKind] = []
    parts: list[str] = []
    """Part types (`text`, `media`, `action`, …): a message with at least one of them matches."""


class Processor(_Table, frozen=True, kw_only=True):
    id: str
    tenant: str
    transport: str = "nats"
    """The processor transport: `nats` (your app subscribes to the subjects itself), `http`, `websocket`,
    `redis`, `echo` (the built-in demo processor), `audio_loopback` (the built-in demo audio service: every
    call hears itself), or any other installed one."""
    secrets: dict[str, str] = {}
    """The transport's credentials (its `ProcessorTransport.Secrets`: a signing secret, a Redis password),
    checked when the hub starts and masked wherever text leaves the hub."""
    options: dict[str, Any] = {}
    """The transport's other settings (its `ProcessorTransport.Options`), checked when the hub starts."""
    routes: list[Route] = []
    """Which of its tenant's inbound envelopes it is handed: those matching any route; none = all."""


class Config(_Table, frozen=True, kw_only=True):
    hub: HubSettings = HubSettings()
    tenants: list[Tenant] = []
    connections: list[Connection] = []
    processors: list[Processor] = []

    def connection(self, connection_id: str) -> Connection | None:
        return next((c for c in self.connections if c.id == connection_id), None)

    def send_deadline(self, connection: Connection) -> float:
        """Seconds an outbound message of `connection` may wait out a failing channel."""
        if connection.send_deadline_seconds is not None:
            return connection.send_deadline_seconds
        return self.hub.send_deadline_seconds


_ENV_PREFIX = "BABELHUB_"


def load(
    path: str | Path | None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Read the TOML file at `path` (or start empty), apply `BABELHUB_<KEY>` variables to `[hub]`, then
    `overrides` (command-line flags), and validate the result."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = msgspec.toml.decode(Path(path).read_bytes())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except msgspec.DecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    hub = dict(raw.get("hub", {}))
    hub.update(_from_env(os.environ if env is None else env))
    hub.update({key: value for key, value in (overrides or {}).items() if value is not None})
    raw["hub"] = hub
    try:
        config = msgspec.convert(raw, Config, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{path or 'config'}: {_secret_named(str(exc), raw)}") from None
    _check(config)
    return config


def _secret_named(message: str, raw: dict[str, Any]) -> str:
    """msgspec calls a secret that is not text `$.connections[<i>].secrets[...]`: name it, as found in
    the raw config, so the operator knows which one to fix (its value is never shown)."""
    found = re.search(r"\$\.connections\[(\d+)\]\.secrets\[\.\.\.\]", message)
    if found is None:
        return message
    secrets = raw["connections"][int(found[1])]["secrets"]
    name = next((name for name, value in secrets.items() if not isinstance(value, str)), None)
    if name is None:
        return message
    return message.replace(found[0], found[0].removesuffix("[...]") + f".{name}")


def _from_env(env: Mapping[str, str]) -> dict[str, str]:
    fields = set(HubSettings.__struct_fields__)
    settings: dict[str, str] = {}
    for name, value in env.items():
        if not name.startswith(_ENV_PREFIX):
            continue
        key = name[len(_ENV_PREFIX) :].lower()
        if key not in fields:
            raise ConfigError(f"unknown environment variable {name}; known: "
                              + ", ".join(_ENV_PREFIX + f.upper() for f in sorted(fields)))
        settings[key] = value
    return settings


def _check(config: Config) -> None:
    """What types alone cannot say: ids are safe and unique, references resolve."""
    tenants = _unique("tenants", [t.id for t in config.tenants])
    if HUB_TENANT in tenants:  # where the operator's audit events are kept: no tenant may read them as its own
        raise ConfigError(f"$.tenants[{[t.id for t in config.tenants].index(HUB_TENANT)}].id: {HUB_TENANT!r} "
                          "is reserved")
    _unique("connections", [c.id for c in config.connections])
    _unique("processors", [p.id for p in config.processors])
    if not re.match(r"^[A-Za-z0-9_-]+$", config.hub.subject_prefix):
        raise ConfigError(f"hub.subject_prefix {config.hub.subject_prefix!r} must be one subject token")
    _check_web_limits(config.hub)
    if not 1 <= config.hub.replicas <= MAX_REPLICAS:
        raise ConfigError(f"hub.replicas: {config.hub.replicas} must be 1 to {MAX_REPLICAS} (JetStream's limit)")
    if not 1 <= config.hub.partitions <= MAX_PARTITIONS:
        raise ConfigError(f"hub.partitions: {config.hub.partitions} must be 1 to {MAX_PARTITIONS}")
    if not 1.0 <= config.hub.lease_seconds <= 300.0:
        raise ConfigError(f"hub.lease_seconds: {config.hub.lease_seconds} must be 1 to 300")
    for name in ("send_deadline_seconds", "circuit_max_backoff_seconds", "call_timeout_seconds"):
        _check_duration(f"hub.{name}", getattr(config.hub, name))
    for index, connection in enumerate(config.connections):
        if connection.tenant not in tenants:
            raise ConfigError(f"$.connections[{index}].tenant: no tenant {connection.tenant!r}")
        if not re.match(r"^[a-z0-9_]+$", connection.channel):
            raise ConfigError(f"$.connections[{index}].channel: {connection.channel!r} is not a channel name")
        if connection.max_rate is not None and not 0 <= connection.max_rate < float("inf"):
            raise ConfigError(f"$.connections[{index}].max_rate: {connection.max_rate} is not a rate (0 or more)")
        if connection.send_deadline_seconds is not None:
            _check_duration(f"$.connections[{index}].send_deadline_seconds", connection.send_deadline_seconds)
        if connection.mode:
            _check_installed(f"$.connections[{index}].mode", connection.mode, SOURCES, "inbound source")
    for index, processor in enumerate(config.processors):
        if processor.tenant not in tenants:
            raise ConfigError(f"$.processors[{index}].tenant: no tenant {processor.tenant!r}")
        _check_installed(f"$.processors[{index}].transport", processor.transport, TRANSPORTS, "processor transport")
        _check_routes(f"$.processors[{index}]", processor, config)
    for index, connection in enumerate(config.connections):
        _check_settings(f"$.connections[{index}]", connection)
        _check_failover(f"$.connections[{index}].failover", connection, config)


def check_connection(connection: Connection, others: list[Connection]) -> None:
    """A connection made at run time (`babelhub.services.managed`), checked as `load` checks the file's;
    `others`: the connections it may fail over to. ConfigError whose message starts with the JSON path
    of what is wrong in it (`$.secrets.bot_token: missing; …`), never with a secret's value."""
    if not re.match(_ID, connection.id):
        raise ConfigError(f"$.id: {connection.id[:80]!r} may only use letters, digits, '_' and '-' (1 to 64)")
    if not re.match(r"^[a-z0-9_]+$", connection.channel):
        raise ConfigError(f"$.channel: {connection.channel[:80]!r} is not a channel name")
    if connection.max_rate is not None and not 0 <= connection.max_rate < float("inf"):
        raise ConfigError(f"$.max_rate: {connection.max_rate} is not a rate (0 or more)")
    if connection.send_deadline_seconds is not None:
        _check_duration("$.send_deadline_seconds", connection.send_deadline_seconds)
    if connection.mode:
        _check_installed("$.mode", connection.mode, SOURCES, "inbound source")
    _check_settings("$", connection)
    _check_failover("$.failover", connection, Config(connections=[*others, connection]))


_CONVERSATION_TYPES = ("direct", "group", "channel", "thread")


def _check_routes(path: str, processor: Processor, config: Config) -> None:
    """A route names only its processor's tenant's connections, and conversation types that exist."""
    own = {connection.id for connection in config.connections if connection.tenant == processor.tenant}
    for index, route in enumerate(processor.routes):
        for at, connection in enumerate(route.connections):
            if connection not in own:
                raise ConfigError(f"{path}.routes[{index}].connections[{at}]: no connection {connection!r} "
                                  f"of tenant {processor.tenant!r}")
        for at, kind in enumerate(route.conversation_types):
            if kind not in _CONVERSATION_TYPES:
                raise ConfigError(f"{path}.routes[{index}].conversation_types[{at}]: {kind!r} is not one of "
                                  + ", ".join(_CONVERSATION_TYPES))
        for at, part in enumerate(route.parts):
            if part not in PART_TYPES:
                raise ConfigError(f"{path}.routes[{index}].parts[{at}]: {part!r} is not one of "
                                  + ", ".join(sorted(PART_TYPES)))


def _check_failover(path: str, connection: Connection, config: Config) -> None:
    """A failover names another connection of the same tenant, after a real duration, and following
    failovers from there never comes back (A→B→A would send one message around forever)."""
    failover = connection.failover
    if failover is None:
        return
    _check_duration(f"{path}.after_seconds", failover.after_seconds)
    target = config.connection(failover.to)
    if target is None or target.tenant != connection.tenant or target.id == connection.id:
        raise ConfigError(f"{path}.to: no other connection {failover.to!r} of tenant {connection.tenant!r}")
    chain = [connection.id]
    while target is not None:
        if target.id in chain:
            raise ConfigError(f"{path}.to: failover goes round in a cycle: {' -> '.join([*chain, target.id])}")
        chain.append(target.id)
        target = config.connection(target.failover.to) if target.failover is not None else None


def _check_installed(path: str, name: str, group: str, what: str) -> None:
    """Plug-ins are found by name (`babelhub.plugins`): a name no installed one has is refused here."""
    names = installed(group)
    if name not in names:
        raise ConfigError(f"{path}: no {what} {name!r}; installed: {', '.join(names) or 'none'}")


def _check_settings(path: str, connection: Connection) -> None:
    """The connection's channel has a codec, and its secrets and options are the ones that codec
    declares: a missing, misspelt or mistyped one fails here rather than at the first send."""
    try:
        codec = channel_codec(connection.channel)
    except LookupError as exc:
        raise ConfigError(f"{path}.channel: {exc}") from None
    secrets, options = dict(connection.secrets), dict(connection.options)
    if connection.mode:  # the source's own settings are taken out of what the codec is given
        source = load_class(SOURCES, connection.mode, object, "inbound source")
        for kind, given in (("secrets", secrets), ("options", options)):
            _check_source_settings(f"{path}.{kind}", getattr(source, f"{kind[:-1]}_settings", None), given)
    try:
        read_settings(codec, secrets, options)
    except SettingsError as exc:
        raise ConfigError(f"{path}.{exc.path}: {exc.reason}") from None


def _check_source_settings(path: str, declared: type[Settings] | None, given: dict[str, Any]) -> None:
    """Check the settings an inbound source declares (its `secret_settings` / `option_settings`) and take
    them out of `given`: the rest belongs to the channel."""
    if declared is None:
        return
    names = {field.encode_name for field in msgspec.structs.fields(declared)}
    own = {name: given.pop(name) for name in list(given) if name in names}
    try:
        msgspec.convert(own, declared)
    except msgspec.ValidationError as exc:
        reason, _, where = str(exc).partition(" - at `$")
        raise ConfigError(f"{path}{where.rstrip('`')}: {reason}") from None


def channel_codec(channel: str) -> codecs.Codec:
    """The codec of `channel`'s connections: its channel codec, or for a telephony media stream
    (`babelhub.media`) the stand-in that declares the provider's secrets and refuses messages
    (`babelhub.media.channel`). LookupError when neither is installed."""
    if is_media_channel(channel):
        return media_channel(channel)
    return codecs.load(channel)


def _check_web_limits(hub: HubSettings) -> None:
    positive = {"body_timeout_seconds": hub.body_timeout_seconds, "max_frame_bytes": hub.max_frame_bytes,
                "max_sockets_per_ip": hub.max_sockets_per_ip, "session_frame_rate": hub.session_frame_rate,
                "session_frame_burst": hub.session_frame_burst, "media_max_frame_bytes": hub.media_max_frame_bytes,
                "media_frame_rate": hub.media_frame_rate, "media_frame_burst": hub.media_frame_burst,
                "media_queue_seconds": hub.media_queue_seconds}
    for name, value in positive.items():
        if not 0 < value < float("inf"):
            raise ConfigError(f"hub.{name}: {value} must be more than 0")


def _check_duration(path: str, seconds: float) -> None:
    if not 0 < seconds < float("inf"):
        raise ConfigError(f"{path}: {seconds} is not a duration (more than 0 seconds)")


def _unique(table: str, ids: list[str]) -> set[str]:
    seen: set[str] = set()
    for index, value in enumerate(ids):
        if not re.match(_ID, value):
            raise ConfigError(f"$.{table}[{index}].id: {value!r} may only use letters, digits, '_' and '-'")
        if value in seen:
            raise ConfigError(f"$.{table}[{index}].id: {value!r} is used twice")
        seen.add(value)
    return seen
