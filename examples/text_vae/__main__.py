"""``python examples/text_vae``: the demo (as ``python examples/text_vae.py``)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from text_vae.cli import main  # noqa: E402

main()
