"""Engage: a next-best-action engine for customer engagement teams."""

__version__ = "0.1.0"
