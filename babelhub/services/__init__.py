"""Services: what the actors and the composition layer stand on: the NATS broker and publisher,
connections and delivery, ingest, dead letters, telemetry."""
