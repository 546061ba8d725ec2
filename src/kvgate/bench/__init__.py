"""Measuring kvgate: micro-benchmarks of the routing core, trace replay in virtual time against
routing policies, and live load against an OpenAI endpoint."""
