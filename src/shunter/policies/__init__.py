"""Routing policies: one module each, behind the ``Policy`` interface in ``base``."""
