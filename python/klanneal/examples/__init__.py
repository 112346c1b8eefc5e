"""Runnable examples built on klanneal's public API (see ``examples/`` in the repository)."""
