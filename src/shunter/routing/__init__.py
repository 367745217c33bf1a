"""One request at a time: choose a worker, try it, retry elsewhere, hand back the reply.
No ASGI and no transport here: the API layer writes replies, the backends do the I/O."""
