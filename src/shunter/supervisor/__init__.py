"""``--workers N``: N gateway processes on one host, one port, one parent that keeps them."""
