"""``python examples/single_cell_vae``: the example (as ``python examples/single_cell_vae.py``)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from single_cell_vae.cli import main  # noqa: E402

main()
