"""HTTP/1.1 on the wire, both ways: our server for clients, our streaming client and the
pyreqwest adapter for workers, the interface they share (byte-pair headers throughout) and a
mock of it for tests. Nothing here knows about inference or workers."""
