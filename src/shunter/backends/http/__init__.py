"""Workers reached over HTTP: a connection pool per worker, and each engine's own endpoints."""
