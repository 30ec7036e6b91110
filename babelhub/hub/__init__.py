"""The composition layer: `Hub` (app.py) wires services, actors and plug-ins into one process; `cli.py`
is the `babelhub` command."""
