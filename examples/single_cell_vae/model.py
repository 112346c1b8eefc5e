"""An scVI-like VAE (Lopez et al., Nature Methods 2018), with scvi-tools' names.

Encoder: log1p(counts) [B, G] -> 128 -> q(z|x) = N(qz_m, exp(qz_logvar)), [B, 10].
Decoder: z -> 128 -> px_scale = softmax over genes, px_rate = library x px_scale
(the observed library size, scvi-tools' ``use_observed_lib_size=True``), and
px_dropout, the zero-inflation logits [B, G]. The inverse dispersion is one
learnable number per gene, theta = exp(px_r) (scvi-tools' ``dispersion="gene"``).
Hidden layers as scvi-tools' FCLayers: Linear, BatchNorm1d (momentum 0.01,
eps 1e-3), ReLU, and dropout 0.1 in the encoder.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class VAEOutput(NamedTuple):
    """One forward pass: the likelihood's parameters and q(z|x)'s."""

    px_rate: torch.Tensor  # [B, G] the ZINB mean, > 0
    px_dropout: torch.Tensor  # [B, G] zero-inflation logits
    qz_m: torch.Tensor  # [B, L]
    qz_logvar: torch.Tensor  # [B, L]


def _hidden(n_in: int, n_out: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(n_in, n_out),
        nn.BatchNorm1d(n_out, momentum=0.01, eps=1e-3),
        nn.ReLU(),
        nn.Dropout(dropout),
    )


class SingleCellVAE(nn.Module):
    """The scVI-like model; ``forward(counts)`` samples z by the reparameterisation trick."""

    def __init__(
        self, n_genes: int, n_latent: int = 10, n_hidden: int = 128, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.encoder = _hidden(n_genes, n_hidden, dropout)
        self.z_mean = nn.Linear(n_hidden, n_latent)
        self.z_logvar = nn.Linear(n_hidden, n_latent)
        self.decoder = _hidden(n_latent, n_hidden, 0.0)
        self.px_scale_decoder = nn.Linear(n_hidden, n_genes)
        self.px_dropout_decoder = nn.Linear(n_hidden, n_genes)
        # scvi-tools initialises px_r ~ N(0, 1); theta = exp(px_r) keeps it > 0.
        self.px_r = nn.Parameter(torch.randn(n_genes))

    def theta(self) -> torch.Tensor:
        """[G] inverse dispersion per gene, > 0."""
        return self.px_r.exp()

    def encode(self, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(qz_m, qz_logvar), each [B, L], from counts [B, G]."""
        h = self.encoder(torch.log1p(counts))
        return self.z_mean(h), self.z_logvar(h)

    def decode(self, z: torch.Tensor, library: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(px_rate, px_dropout), each [B, G], from z [B, L] and library [B, 1]."""
        h = self.decoder(z)
        px_scale = torch.softmax(self.px_scale_decoder(h), dim=-1)
        return library * px_scale, self.px_dropout_decoder(h)

    def forward(self, counts: torch.Tensor, generator: torch.Generator | None = None) -> VAEOutput:
        qz_m, qz_logvar = self.encode(counts)
        eps = torch.randn(qz_m.shape, generator=generator, dtype=qz_m.dtype)
        z = qz_m + torch.exp(0.5 * qz_logvar) * eps
        # A cell with no counts at all would get px_rate = 0, which the count
        # likelihoods refuse (their mean must be > 0): its library counts as 1.
        library = counts.sum(dim=-1, keepdim=True).clamp_min(1.0)
        px_rate, px_dropout = self.decode(z, library)
        return VAEOutput(px_rate, px_dropout, qz_m, qz_logvar)
