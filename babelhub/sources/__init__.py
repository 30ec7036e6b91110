"""Inbound sources: how a channel's traffic reaches the hub. Each is a `babelhub.plugins.InboundSource`
registered under the `babelhub.sources` entry-point group (the web chat's WebSocket source is
`babelhub.sessions.websocket`)."""
