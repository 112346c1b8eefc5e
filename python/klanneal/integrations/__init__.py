"""Integrations with training frameworks; each imports its framework on first use.

* :mod:`klanneal.integrations.lightning` -- :class:`KLAnnealing`, a Lightning
  callback (``pip install 'klanneal[lightning]'``).
"""

from __future__ import annotations
