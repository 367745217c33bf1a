"""Gateway replicas that share what routing needs, peer to peer (``--peer-port``)."""
