"""Environment switches read on every call (KLANNEAL_DISABLE_NATIVE, KLANNEAL_GRAD_POOL).

A switch is off for "", 0, false, no or off (any case), on for anything else
(csrc/parallel_cpu.cpp reads KLANNEAL_OPENMP the same way).

``os.environ.get`` costs about a microsecond (it encodes the key and decodes
the value); os.environ's own dict, keyed and valued by bytes on POSIX, costs
~50 ns and sees os.environ's updates at once (tests set the variables with
monkeypatch.setenv after import).
"""

from __future__ import annotations

import os
from typing import Optional

_ENV_BYTES: Optional[dict[bytes, bytes]] = getattr(os.environ, "_data", None)
if not (isinstance(_ENV_BYTES, dict) and all(isinstance(k, bytes) for k in _ENV_BYTES)):
    _ENV_BYTES = None


# What switches a flag off: "", 0, false, no, off (any case, surrounding
# spaces ignored); any other value switches it on.
_OFF = frozenset({"", "0", "false", "no", "off"})


def flag_on(value: str) -> bool:
    """A flag's value read as a switch (see _OFF)."""
    return value.strip().lower() not in _OFF


def env_switch(name: str, default: bool) -> bool:
    """The environment variable `name` read as a switch, or `default` when unset."""
    if _ENV_BYTES is not None:
        value = _ENV_BYTES.get(name.encode())
        return default if value is None else flag_on(value.decode(errors="replace"))
    raw = os.environ.get(name)
    return default if raw is None else flag_on(raw)


def native_disabled() -> bool:
    """KLANNEAL_DISABLE_NATIVE is switched on (read on every elbo_loss call)."""
    if _ENV_BYTES is not None:  # unset, the common case: one dict lookup
        value = _ENV_BYTES.get(b"KLANNEAL_DISABLE_NATIVE")
        return value is not None and flag_on(value.decode(errors="replace"))
    return env_switch("KLANNEAL_DISABLE_NATIVE", False)
