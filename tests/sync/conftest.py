from tests.nats_harness import nats_server

__all__ = ["nats_server"]
