"""Upstream transports: how the gateway talks to workers."""
