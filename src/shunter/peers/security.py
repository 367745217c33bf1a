"""The peer channel's security: ZeroMQ's CURVE, keyed by a secret the gateways share.

What peers exchange is not for everyone: routing decisions carry the start of users'
prompts, and hand-registered workers carry their API keys. And what a gateway hears it
acts on: a peer's worker is added to the fleet and routed to. So with a secret
(``--peer-secret-file``, or ``SHUNTER_PEER_SECRET``), every gateway derives the same
Curve25519 key pair from it (SHA-256 of a label and the secret) and uses ZeroMQ's own CURVE
handshake (``zmq_curve(7)``): each PUB is a CURVE server with that pair, each SUB a client
with it that expects that server key.

- Eavesdropping: after the handshake everything is encrypted, and the PUB's ZAP handler
  admits only subscribers presenting the shared public key, so a SUB without the secret
  reads nothing.
- Injection: a SUB completes the handshake only with a PUB that holds the shared secret key,
  so something else listening on a peer's address (a pod that took the labels of
  ``--router-selector``, a process that took the port) cannot feed it.

A handshake that fails is counted (``handshake_failures`` in the dashboard's ``peers``) and
logged: once per peer address, and again after ``LOG_EVERY_SECS`` if it keeps failing.
Without a secret, peers talk in the clear (a private network; the ``--workers`` children's
IPC sockets live in a directory only their user can open), and a gateway peering over TCP
says so once at start.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from dataclasses import dataclass

import zmq
import zmq.utils.z85
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger("shunter.peers")

SECRET_ENV = "SHUNTER_PEER_SECRET"
MIN_SECRET_BYTES = 16  # a shorter secret is refused at start: it would be guessable
_LABEL = b"shunter peer channel, curve key, v1\0"


class PeerSecretError(ValueError):
    """The peer secret cannot be used; the message says why, for the command line."""


def load_secret(path: str | None, environ: dict[str, str] | None = None) -> bytes | None:
    """The shared secret: the file's contents (a trailing newline dropped), else the
    ``SHUNTER_PEER_SECRET`` environment variable; None when neither is given."""
    if path is not None:
        try:
            with open(path, "rb") as file:
                secret = file.read().rstrip(b"\r\n")
        except OSError as exc:
            raise PeerSecretError(f"--peer-secret-file {path}: {exc.strerror}") from None
        source = f"--peer-secret-file {path}"
    else:
        value = (os.environ if environ is None else environ).get(SECRET_ENV)
        if value is None:
            return None
        secret, source = value.encode(), SECRET_ENV
    if len(secret) < MIN_SECRET_BYTES:
        raise PeerSecretError(
            f"{source}: the peer secret must be at least {MIN_SECRET_BYTES} bytes "
            f"(it has {len(secret)}); e.g. `openssl rand -hex 32`"
        )
    return secret


@dataclass(frozen=True)
class PeerKeys:
    """The key pair every gateway sharing the secret derives (Z85, as ZeroMQ takes keys)."""

    public: bytes
    secret: bytes

    @classmethod
    def from_secret(cls, shared: bytes) -> PeerKeys:
        if not zmq.has("curve"):
            raise PeerSecretError("this ZeroMQ build has no CURVE: cannot secure the peers")
        secret = zmq.utils.z85.encode(hashlib.sha256(_LABEL + shared).digest())
        return cls(zmq.curve_public(secret), secret)


class _SharedKeyOnly:
    """The ZAP handler's rule: a subscriber must present the shared public key."""

    def __init__(self, public: bytes) -> None:
        self.public = public

    def callback(self, domain: str, key: bytes) -> bool:
        """``key``: the subscriber's public key, Z85-encoded (pyzmq's ``Authenticator``)."""
        return hmac.compare_digest(key, self.public)


def secure(
    context: zmq.Context[zmq.Socket[bytes]],
    pub: zmq.Socket[bytes],
    sub: zmq.Socket[bytes],
    keys: PeerKeys,
) -> ThreadAuthenticator:
    """Make ``pub`` a CURVE server admitting only the shared key, and ``sub`` a CURVE client
    of such servers; before either binds or connects. Returns the ZAP handler to stop."""
    authenticator = ThreadAuthenticator(context, log=logging.getLogger("shunter.peers.zap"))
    authenticator.start()
    authenticator.configure_curve_callback("*", _SharedKeyOnly(keys.public))
    pub.curve_secretkey = keys.secret
    pub.curve_publickey = keys.public
    pub.curve_server = True
    sub.curve_secretkey = keys.secret
    sub.curve_publickey = keys.public
    sub.curve_serverkey = keys.public
    return authenticator
