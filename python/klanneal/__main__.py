"""``python -m klanneal``: see klanneal._cli."""

from __future__ import annotations

from klanneal._cli import main

raise SystemExit(main())
