"""The single-cell example: an scVI-like VAE on synthetic ZINB counts, monotonic vs
cyclical KL annealing.

Not part of the klanneal package: it is built only on klanneal's public API
(``klanneal.nn.ELBOLoss`` / ``klanneal.elbo_loss`` with
``klanneal.likelihoods.ZeroInflatedNegativeBinomial``, ``klanneal.schedules``,
``klanneal.metrics.active_units``), numpy and torch (matplotlib for the
optional figure). Modules: ``data`` (the seeded generator of the counts and the
train / held-out split), ``model`` (the VAE), ``train`` (schedules, training,
held-out evaluation), ``metrics`` (k-NN accuracy, silhouette, PCA, in torch),
``scvi_formula`` (scvi-tools' ZINB with its epsilon, to measure it), ``report``
(summary, table, figure), ``cli`` (flags, ``main``). Run
``python examples/single_cell_vae.py``.

Units: reconstruction, KL and -ELBO are nats per held-out cell (the sum over
its genes), the convention of scvi-tools' ``reconst_loss`` and of
``reduction="batchmean"``.
"""

from .cli import build_parser, main, parse_args
from .data import CountData, make_counts, split_cells
from .metrics import knn_accuracy, pca_projection, silhouette_score
from .model import SingleCellVAE, VAEOutput
from .scvi_formula import SCVI_EPS, scvi_zinb_nll
from .train import RunResult, eps_effect, evaluate, make_schedule, train_one

__all__ = [
    "SCVI_EPS",
    "CountData",
    "RunResult",
    "SingleCellVAE",
    "VAEOutput",
    "build_parser",
    "eps_effect",
    "evaluate",
    "knn_accuracy",
    "main",
    "make_counts",
    "make_schedule",
    "parse_args",
    "pca_projection",
    "scvi_zinb_nll",
    "silhouette_score",
    "split_cells",
    "train_one",
]
