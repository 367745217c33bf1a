"""Small asyncio building blocks that know nothing of the gateway: a value created once
(single-flight, replaceable) and a periodic background task."""
