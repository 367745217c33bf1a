"""The HTTP API: the only layer that speaks ASGI. Route table and middleware (``app.py``),
one module per group of endpoints, and ``reply.py``, which writes what handlers return."""
