"""Policy plugins the tests load by name (``--policy module:Class``)."""
