"""Prefill/decode disaggregation: a request served by a pair of workers.

``router.py`` routes (the retry loop over pairs and what each engine needs), ``pairs.py``
chooses a pair, ``legs.py`` runs both legs of an SGLang pair at once.
"""
