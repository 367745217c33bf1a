"""Talking to one worker: the only code that knows whether it speaks HTTP or gRPC, and
which engine it runs (SGLang, vLLM, llama.cpp, another OpenAI-compatible server).

Each registered worker owns a ``Backend`` (``base.py``), created at registration by
``connect.py``. The router hands it a request and gets a reply back; the fleet asks it for
health, load, a cache flush or server information. Adding an engine is one module in
``http/engines/``; adding a transport is one package beside ``http/`` and ``grpc/``.
"""
