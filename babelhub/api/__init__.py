"""The hub's REST API for processing apps (`messages.py`)."""
