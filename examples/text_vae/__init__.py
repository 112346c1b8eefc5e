"""The text-VAE example: constant, monotonic and cyclical KL annealing (Fu et al., NAACL 2019).

Not part of the klanneal package: it is built only on klanneal's public API
(``klanneal.elbo_loss``, ``klanneal.schedules``, ``klanneal.metrics``) and
tqdm. Modules: ``data`` (vocabulary, toy set, corpus reader, batches),
``model`` (the VAE), ``train`` (schedules, evaluation, the training loop with
checkpoints), ``report`` (figures, summary, table), ``cli`` (flags, the
fu2019 recipe, ``main``). Run ``python examples/text_vae.py`` (``make demo``).

The pieces: toy data and a
corpus reader, an LSTM-encoder / LSTM-decoder VAE as in the paper's language
model experiments (z feeds the decoder's initial state and every decoder
step), a training loop whose loss and beta come only from klanneal's public
API (``klanneal.elbo_loss`` and ``klanneal.schedules``), the metrics the
paper reports (reconstruction, KL, ELBO, active units, mutual information),
and the figures.

Units: every reconstruction, KL and ELBO is in nats per sequence (the sum
over a sequence's tokens, averaged over sequences), the convention of the
paper's code and of ``reduction="batchmean"``.
"""

from .cli import *  # noqa: F403
from .cli import _worker, main  # noqa: F401
from .data import *  # noqa: F403
from .model import *  # noqa: F403
from .report import *  # noqa: F403
from .train import *  # noqa: F403
from .train import _eval_points, _run_config  # noqa: F401
