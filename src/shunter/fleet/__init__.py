"""The workers the gateway routes to: their identity and run-time state, the registry,
registration, health checks, load reports and circuit breakers. Control plane, per worker:
nothing here handles a request."""
