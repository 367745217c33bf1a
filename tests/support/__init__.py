"""Helpers the tests share: real processes (``harness``) and in-process fakes (``fakes``)."""
