"""Moving bytes and keeping state: the Transport and StateStore Protocols, NATS and in-memory
implementations, streams, the embedded nats-server.
"""
