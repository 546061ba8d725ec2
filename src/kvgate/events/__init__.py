"""KV-cache events: the write side of the prefix index (decode, subscribe, track sequences).

`kvgate.events.types` is the vocabulary shared with the read side (the index) and the engines
that publish (the simulator): it imports nothing beyond the standard library. This package
re-exports nothing, so that importing the types never loads the transport (ZMQ, msgpack) of
`decode`, `subscriber` and `replay`.
"""
