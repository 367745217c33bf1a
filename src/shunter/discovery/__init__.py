"""Kubernetes service discovery: workers from pods (``service.py`` runs it; ``pods.py``
says what pods should be; ``reconciler.py`` makes it so; ``watcher.py`` sees the pods)."""
