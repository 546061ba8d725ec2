"""NVIDIA Dynamo as kvgate's backend: its frontend and workers behind Envoy, kvgate's EPP picking
the worker (`processes`: running them locally; `discovery`: learning the workers from Dynamo)."""
