"""`kvgate up`: the whole gateway on one machine (real Envoy, EPP, body transformer, engines)."""
