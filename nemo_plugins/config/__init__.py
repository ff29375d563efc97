"""Structured configs: the recipes' schemas (``schemas``) and the typed construction of config dataclasses with
one-line, full-path errors (``build``)."""
