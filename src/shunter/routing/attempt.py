"""What one try of a request on one worker can tell the router's retry loop."""

from __future__ import annotations


class RetryAttempt(Exception):
    """This attempt failed in a way another may fix, and nothing reached the client."""
