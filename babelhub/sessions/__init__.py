"""WebSocket sessions: the `websocket` inbound source that carries the built-in web chat (websocket.py),
its resume tokens (tokens.py) and its per-address and per-session limits (limits.py)."""
