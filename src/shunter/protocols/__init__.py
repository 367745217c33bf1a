"""Request and response shapes."""
