"""The exceptions babelhub raises, one per thing that can be wrong."""

from __future__ import annotations


class BabelhubError(Exception):
    """Base of every babelhub exception."""


class DecodeError(BabelhubError, ValueError):
    """Input could not be read: `path` is the JSON path (or form field) of what is wrong."""

    def __init__(self, message: str, path: str = "$") -> None:
        super().__init__(f"{message} (at {path})")
        self.reason = message
        self.path = path


class SignatureError(BabelhubError):
    """A webhook's signature, token or timestamp did not verify."""


class EncodeError(BabelhubError, ValueError):
    """A canonical message cannot be turned into the channel's native request."""


class ConfigError(BabelhubError, ValueError):
    """The configuration is invalid; the message names the key."""


class PayloadTooLarge(BabelhubError, ValueError):
    """A NATS message (payload and headers together) would exceed the connected server's `max_payload`.

    Sending it would make nats-server close the connection, so the hub refuses it before it is sent."""

    def __init__(self, subject: str, size: int, limit: int) -> None:
        super().__init__(f"a {size}-byte message for {subject} exceeds the NATS server's max_payload of {limit} bytes")
        self.subject = subject
        self.size = size
        self.limit = limit
