"""Envoy ext_proc services: the endpoint picker (`epp` per request, `epp_runtime` per process) and
the body transformer, the listeners both serve (`listeners`), protocol helpers and metrics."""
