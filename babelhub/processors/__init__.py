"""Processor transports: how a tenant's processing app receives inbound envelopes and answers. Each
is a `babelhub.plugins.ProcessorTransport` registered under the `babelhub.transports` entry-point group."""
