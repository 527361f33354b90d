"""Quelay: a relay for shared, slow, intermittent links."""

__version__ = "0.1.0"
