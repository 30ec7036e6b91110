"""Where a tenant may point the hub: the `api_base` of a connection made over the API.

A tenant's admin key can make connections at run time, and the hub then calls their `api_base` with the
tenant's secrets from inside the operator's network. Left open, that is a way in: to the cloud's
metadata service (169.254.169.254), to the hub's own NATS, to anything on the private network. So an
`api_base` must be an http(s) URL whose host resolves only to public addresses, unless the operator
allows private ones (`hub.allow_private_api_base`: local fakes in tests, a channel gateway on the LAN).
The check is made when the connection is made or changed; a name that resolves elsewhere later is the
operator's firewall's to stop.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit

__all__ = ["api_base_problem"]


async def api_base_problem(api_base: str, *, allow_private: bool) -> str:
    """Why `api_base` cannot be called for a tenant, or "" when it can."""
    parts = urlsplit(api_base)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "api_base is an http(s) URL with a host"
    if allow_private:
        return ""
    try:
        port = parts.port
    except ValueError:
        return "api_base has no valid port"
    try:
        found = await asyncio.get_running_loop().getaddrinfo(parts.hostname, port or 443, type=socket.SOCK_STREAM)
    except OSError:
        return f"api_base's host {parts.hostname!r} does not resolve"
    for *_, address in found:
        ip = ipaddress.ip_address(address[0])
        if not ip.is_global:
            return (f"api_base's host {parts.hostname!r} is a private, loopback or link-local address ({ip}); "
                    "the operator may allow them (hub.allow_private_api_base)")
    return ""
