"""Worker addresses: which URLs name a worker the gateway can call, in one spelling each.

A URL given without a scheme gets ``http://`` (and is probed as gRPC too, at registration);
the scheme is lower-cased and a trailing slash dropped, so one worker has one registry key.
"""

from __future__ import annotations

from urllib.parse import urlsplit

WORKER_SCHEMES = ("http", "https", "grpc")
NOT_YET_SCHEMES = ("grpcs",)  # TLS to gRPC workers is not built yet


class WorkerUrlError(ValueError):
    """A URL that does not name a worker the gateway can call; the message says why."""


def normalize_worker_url(url: str) -> str:
    """Add ``http://`` to a URL given without a scheme and drop a trailing slash."""
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    scheme, rest = url.split("://", 1)
    return f"{scheme.lower()}://{rest.rstrip('/')}"


def validate_worker_url(url: str) -> str:
    """The normalised URL; raises WorkerUrlError when it is not a worker address."""
    normalised = normalize_worker_url(url)
    try:
        parts = urlsplit(normalised)
        port = parts.port
    except ValueError as exc:
        raise WorkerUrlError(f"worker URL {url!r} is malformed: {exc}") from None
    if parts.scheme in NOT_YET_SCHEMES:
        raise WorkerUrlError(f"worker URL {url!r}: TLS to gRPC workers is not supported yet")
    if parts.scheme not in WORKER_SCHEMES:
        raise WorkerUrlError(
            f"worker URL {url!r} has scheme {parts.scheme!r}; use one of "
            + ", ".join(WORKER_SCHEMES)
        )
    if not parts.hostname:
        raise WorkerUrlError(f"worker URL {url!r} has no host")
    if port == 0:
        raise WorkerUrlError(f"worker URL {url!r} has port 0")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise WorkerUrlError(
            f"worker URL {url!r} must not carry credentials, a query or a fragment"
        )
    return normalised
