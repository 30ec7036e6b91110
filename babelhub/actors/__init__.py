"""The actor runtime (runtime.py, admission.py) and the hub's actors: one per connection (decoding,
connection.py) and one per conversation (state, routing, sending, conversation.py)."""
