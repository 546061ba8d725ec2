"""The whole gateway on one machine (real Envoy, EPP, body transformer, engines), behind `kvgate
up` and `kvgate demo`."""
