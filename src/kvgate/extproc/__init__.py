"""Envoy ext_proc servers: the endpoint picker (EPP) and, later, the body transformer."""
