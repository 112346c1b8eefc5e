"""The synthetic count matrix: cell types in a latent space, drawn from a ZINB.

Everything the model is asked to recover is known here: each cell's type and
latent position, its library size, every gene's dispersion and dropout rate.
The generative process is scVI's own (Lopez et al., Nature Methods 2018) with
a random decoder in place of the trained one:

    z_n        = c_{t_n} + s e_n           t_n: the cell's type, c_k ~ N(0, I) the K centres
    rho_n      = softmax(z_n W + b)        W [d, G], b [G] (a gene's baseline expression)
    mean_ng    = l_n rho_ng                l_n log-normal (the cell's library size)
    w_ng       ~ Gamma(theta_g, rate theta_g / mean_ng)   theta_g log-normal (per gene)
    x_ng       ~ Poisson(w_ng), then set to 0 with probability pi_g (per-gene dropout)

so x_ng ~ ZINB(mean_ng, theta_g, pi_g): the likelihood the model fits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# The generating process's constants (the flags choose only the sizes and the seed).
TRUE_LATENT_DIM = 5  # d: the dimension the cell types live in (the model's latent is 10)
WITHIN_TYPE_SD = 0.5  # s: spread of a type around its centre (centres ~ N(0, I))
GENE_LOADING_SD = 0.25  # W ~ N(0, 0.25^2): how strongly z moves a gene's share
BASELINE_SD = 1.0  # b ~ N(0, 1): genes from rare to abundant
LIBRARY_LOG_MEAN = float(np.log(1000.0))  # median library size 1000 counts per cell
LIBRARY_LOG_SD = 0.4
THETA_LOG_MEAN = float(np.log(3.0))  # median inverse dispersion 3 (variance mu + mu^2 / 3)
THETA_LOG_SD = 0.5
DROPOUT_LOGIT_MEAN = -2.0  # median dropout probability sigmoid(-2) = 0.12
DROPOUT_LOGIT_SD = 1.0


@dataclass(frozen=True)
class CountData:
    """A synthetic data set and the truth behind it (N cells, G genes, K types).

    Attributes:
        counts: [N, G] float32, whole numbers >= 0.
        cell_type: [N] int64 in [0, K).
        latent: [N, d] float32, the z each cell was drawn from.
        library: [N] float32, the library size l_n of the mean (not the observed total).
        mean: [N, G] float32, l_n rho_ng: the NB mean before dropout.
        theta: [G] float32, per-gene inverse dispersion.
        dropout: [G] float32, per-gene zero-inflation probability pi_g.
    """

    counts: torch.Tensor
    cell_type: torch.Tensor
    latent: torch.Tensor
    library: torch.Tensor
    mean: torch.Tensor
    theta: torch.Tensor
    dropout: torch.Tensor

    @property
    def n_types(self) -> int:
        return int(self.cell_type.max()) + 1


def make_counts(n_cells: int, n_genes: int, n_types: int, seed: int) -> CountData:
    """Draws the data set; the same arguments give the same counts, bit for bit.

    Args:
        n_cells: N >= 1.
        n_genes: G >= 1.
        n_types: K >= 1 cell types, assigned uniformly at random.
        seed: seeds the one numpy Generator every draw comes from.

    Raises:
        ValueError: a size below 1.
    """
    for name, value in (("n_cells", n_cells), ("n_genes", n_genes), ("n_types", n_types)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 1.0, (n_types, TRUE_LATENT_DIM))
    cell_type = rng.integers(0, n_types, n_cells)
    latent = centres[cell_type] + WITHIN_TYPE_SD * rng.normal(size=(n_cells, TRUE_LATENT_DIM))
    loadings = rng.normal(0.0, GENE_LOADING_SD, (TRUE_LATENT_DIM, n_genes))
    baseline = rng.normal(0.0, BASELINE_SD, n_genes)
    logits = latent @ loadings + baseline
    share = np.exp(logits - logits.max(axis=1, keepdims=True))
    share /= share.sum(axis=1, keepdims=True)
    library = np.exp(rng.normal(LIBRARY_LOG_MEAN, LIBRARY_LOG_SD, n_cells))
    mean = library[:, None] * share
    theta = np.exp(rng.normal(THETA_LOG_MEAN, THETA_LOG_SD, n_genes))
    dropout = 1.0 / (1.0 + np.exp(-rng.normal(DROPOUT_LOGIT_MEAN, DROPOUT_LOGIT_SD, n_genes)))
    # The gamma-Poisson mixture is the negative binomial with mean `mean` and
    # inverse dispersion theta (numpy's gamma takes the scale, 1 / rate).
    rate = rng.gamma(theta, mean / theta)
    counts = rng.poisson(rate)
    counts[rng.random(counts.shape) < dropout] = 0

    def f32(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))

    return CountData(
        counts=f32(counts),
        cell_type=torch.from_numpy(cell_type.astype(np.int64)),
        latent=f32(latent),
        library=f32(library),
        mean=f32(mean),
        theta=f32(theta),
        dropout=f32(dropout),
    )


def split_cells(n_cells: int, holdout: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) cell indices, a seeded random split; both non-empty.

    Raises:
        ValueError: fewer than 2 cells, or ``holdout`` outside (0, 1).
    """
    if n_cells < 2:
        raise ValueError(f"a train/held-out split needs >= 2 cells, got {n_cells}")
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout must be in (0, 1), got {holdout}")
    order = torch.randperm(n_cells, generator=torch.Generator().manual_seed(seed))
    n_held = min(max(1, round(holdout * n_cells)), n_cells - 1)
    return order[n_held:], order[:n_held]
