"""What one client may make the HTTP server hold: head sizes, deadlines, connections.

Every limit bounds what a hostile or broken client can cost before the app (and its API key
check) sees a request. The defaults are the ones the established servers settled on:

- request line and each header 8190 bytes: aiohttp's ``max_line_size`` and
  ``max_field_size``;
- 100 headers: hyper's ``max_headers`` (aiohttp's server allows 128);
- 64 KiB for the whole head: between h11's 16 KiB ``max_incomplete_event_size`` and hyper's
  ~400 KiB read buffer; an API client's head is well under 4 KiB;
- 30 s to send a whole head: hyper's ``header_read_timeout``;
- 30 s without a body byte while the app waits for one: the same budget for the body (nginx's
  client_body_timeout, the wait between two body reads, is 60 s).

A head over a limit is answered 431 (414 for the request line), a deadline 408; both close.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

# Descriptors the gateway needs besides client and worker connections: listening sockets,
# the metrics listener and its scrapes, health probes, log files, the event loop's own.
RESERVED_FILES = 64
_UNLIMITED_FILES = 1 << 20  # what an unlimited open-file limit is taken to mean
MIN_REQUEST_LINE_BYTES = len(b"GET / HTTP/1.1")


def default_max_connections(open_files: int | None = None) -> int:
    """Half the open-file limit, less a reserve: each proxied client connection also holds a
    connection to a worker, so a cap any higher lets the gateway run out of descriptors
    (accept() failing with EMFILE) before it refuses anyone."""
    if open_files is None:
        open_files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if open_files == resource.RLIM_INFINITY or open_files < 0:
        open_files = _UNLIMITED_FILES
    return max(1, (open_files - RESERVED_FILES) // 2)


@dataclass(frozen=True)
class ServerLimits:
    max_request_line_bytes: int = 8190
    max_header_bytes: int = 8190  # one header: name and value
    max_headers: int = 100
    max_request_head_bytes: int = 64 * 1024  # request line, headers and line ends together
    request_head_timeout_secs: float = 30.0  # from a head's first byte to its end
    request_body_timeout_secs: float = 30.0  # longest wait for a body byte the app asked for
    max_connections: int | None = None  # None: default_max_connections() at start

    def validate(self) -> ServerLimits:
        for flag, value in (
            ("--max-request-line-bytes", self.max_request_line_bytes),
            ("--max-header-bytes", self.max_header_bytes),
            ("--max-headers", self.max_headers),
            ("--max-request-head-bytes", self.max_request_head_bytes),
        ):
            if value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        if self.max_request_line_bytes < MIN_REQUEST_LINE_BYTES:
            raise ValueError(f"--max-request-line-bytes must be >= {MIN_REQUEST_LINE_BYTES}")
        if self.max_request_head_bytes < self.max_request_line_bytes:
            raise ValueError("--max-request-head-bytes must be >= --max-request-line-bytes")
        for flag, secs in (
            ("--request-head-timeout-secs", self.request_head_timeout_secs),
            ("--request-body-timeout-secs", self.request_body_timeout_secs),
        ):
            if not secs > 0:
                raise ValueError(f"{flag} must be > 0, got {secs}")
        if self.max_connections is not None and self.max_connections < 1:
            raise ValueError(f"--max-connections must be >= 1, got {self.max_connections}")
        return self

    def connection_cap(self) -> int:
        """``max_connections``, or the default computed from the open-file limit now."""
        if self.max_connections is not None:
            return self.max_connections
        return default_max_connections()
