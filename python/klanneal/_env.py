"""Environment switches read on every call (KLANNEAL_DISABLE_NATIVE, KLANNEAL_GRAD_POOL).

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


def env_flag(name: str, default: str) -> str:
    """The environment variable `name` (os.environ, read at every call), or `default`."""
    if _ENV_BYTES is not None:
        value = _ENV_BYTES.get(name.encode())
        return default if value is None else value.decode(errors="replace")
    return os.environ.get(name, default)


def native_disabled() -> bool:
    """KLANNEAL_DISABLE_NATIVE is set to something other than "" or "0"."""
    if _ENV_BYTES is not None:  # on every elbo_loss call: the bytes directly
        return _ENV_BYTES.get(b"KLANNEAL_DISABLE_NATIVE", b"0") not in (b"", b"0")
    return env_flag("KLANNEAL_DISABLE_NATIVE", "0") not in ("", "0")
