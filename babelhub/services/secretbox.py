"""Secrets encrypted at rest: the credentials of connections made over the API (`babelhub.services.managed`).

Each value is sealed with AES-256-GCM under the hub's master key (`hub.master_key`, or the file
`hub.master_key_file`; 32 bytes, URL-safe base64), with a fresh random 96-bit nonce, and bound to where
it belongs: the connection id and the secret's name are its associated data, so a ciphertext copied to
another connection or another secret does not open. A sealed value reads `v1.<key id>.<nonce +
ciphertext, URL-safe base64>`; the key id (a digest of the key, which tells nothing of it) says which
master key sealed it, so that during a rotation the hub opens values under the previous key too
(`hub.previous_master_key_file`) while `babelhub master-key rotate` seals them again under the new one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = ["KEY_BYTES", "NoMasterKey", "SealedWrongly", "SecretBox", "key_id", "master_keys", "new_key",
           "read_key", "write_key_file"]

KEY_BYTES: Final = 32
NONCE_BYTES: Final = 12
VERSION: Final = "v1"
_AAD_PREFIX: Final = b"babelhub-connection-secret\x00"


class NoMasterKey(Exception):
    """The hub has no master key, so it cannot keep a secret at rest (message names the setting)."""


class SealedWrongly(Exception):
    """A sealed value does not open: tampered with, moved to another connection or secret, or sealed
    under a master key this hub does not hold. The message never holds the value."""


def new_key() -> str:
    """A fresh master key: 32 random bytes, URL-safe base64."""
    return base64.urlsafe_b64encode(secrets.token_bytes(KEY_BYTES)).decode()


def read_key(text: str, where: str) -> bytes:
    """The 32 bytes of a master key written as URL-safe base64; ValueError naming `where` (never the text)."""
    try:
        key = base64.urlsafe_b64decode(text.strip().encode())
    except (binascii.Error, ValueError):
        raise ValueError(f"{where}: not URL-safe base64 (make one with `babelhub master-key new <file>`)") from None
    if len(key) != KEY_BYTES:
        raise ValueError(f"{where}: a master key is {KEY_BYTES} bytes, this one is {len(key)}")
    return key


def key_id(key: bytes) -> str:
    """Which master key sealed a value: 8 hex digits of a digest of the key."""
    return hashlib.sha256(b"babelhub-master-key-id\x00" + key).hexdigest()[:8]


def write_key_file(path: str | Path) -> str:
    """Write a fresh master key to `path` (which must not exist), readable by its owner only; its key id."""
    text = new_key()
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(text + "\n")
    return key_id(read_key(text, str(path)))


def master_keys(master_key: str, master_key_file: str, previous_key_file: str = "") -> tuple[str, list[bytes]]:
    """The hub's master keys from its settings: the text values that must be masked, and the keys (the
    current one first, then the previous one); no keys when none is configured. ValueError naming the
    setting that is unreadable."""
    texts: list[str] = []
    keys: list[bytes] = []
    if master_key and master_key_file:
        raise ValueError("hub.master_key and hub.master_key_file: set one of them, not both")
    for setting, text, is_file in (("hub.master_key", master_key, False),
                                   ("hub.master_key_file", master_key_file, True),
                                   ("hub.previous_master_key_file", previous_key_file, True)):
        if not text:
            continue
        value = _read_file(setting, text) if is_file else text
        texts.append(value.strip())
        keys.append(read_key(value, setting))
    if previous_key_file and len(keys) == 1:
        raise ValueError("hub.previous_master_key_file: given without a current master key (hub.master_key or "
                         "hub.master_key_file)")
    return "\n".join(texts), keys


def _read_file(setting: str, path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise ValueError(f"{setting}: cannot read {path}: {exc.strerror}") from None


class SecretBox:
    """Seals with the first key given, opens with any of them."""

    def __init__(self, keys: Iterable[bytes]) -> None:
        self._keys = {key_id(key): AESGCM(key) for key in keys}
        self._current = next(iter(self._keys), "")

    def __bool__(self) -> bool:
        return bool(self._current)

    @property
    def current(self) -> str:
        """The id of the key new values are sealed with ("" when there is none)."""
        return self._current

    def seal(self, value: str, connection: str, name: str) -> str:
        if not self._current:
            raise NoMasterKey("no master key is configured: set hub.master_key (BABELHUB_MASTER_KEY) or "
                              "hub.master_key_file (make one with `babelhub master-key new <file>`)")
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._keys[self._current].encrypt(nonce, value.encode("utf-8"), _bound_to(connection, name))
        return f"{VERSION}.{self._current}.{base64.urlsafe_b64encode(nonce + sealed).decode()}"

    def open(self, sealed: str, connection: str, name: str) -> str:
        version, _, rest = sealed.partition(".")
        sealed_by, _, body = rest.partition(".")
        if version != VERSION or not body:
            raise SealedWrongly(f"secret {name!r} of connection {connection!r} is not a sealed value")
        cipher = self._keys.get(sealed_by)
        if cipher is None:
            raise SealedWrongly(f"secret {name!r} of connection {connection!r} is sealed under master key "
                                f"{sealed_by}, which this hub does not hold")
        try:
            data = base64.urlsafe_b64decode(body.encode())
            plain = cipher.decrypt(data[:NONCE_BYTES], data[NONCE_BYTES:], _bound_to(connection, name))
            return plain.decode("utf-8")
        except (InvalidTag, binascii.Error, ValueError, UnicodeDecodeError):
            raise SealedWrongly(f"secret {name!r} of connection {connection!r} does not open: altered, or "
                                "moved from another connection or secret") from None

    def sealed_by(self, sealed: str) -> str:
        """The id of the key that sealed `sealed`."""
        return sealed.partition(".")[2].partition(".")[0]


def _bound_to(connection: str, name: str) -> bytes:
    return _AAD_PREFIX + connection.encode() + b"\x00" + name.encode()
