"""Exact cache state from the engines: SGLang's and vLLM's KV-cache events over ZeroMQ,
decoded (``wire``), applied to a per-model block index (``index``) by one subscriber per
worker (``subscriber``), and read by the precise ``cache_aware`` policy (``scorer``)."""
