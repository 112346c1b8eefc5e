"""The LSTM-encoder / LSTM-decoder VAE of the paper's language-model experiments."""

from __future__ import annotations

import torch
from torch import nn

from .data import PAD_ID, Batch

# --------------------------------------------------------------------------- model


class TextVAE(nn.Module):
    """LSTM encoder / LSTM decoder VAE (Bowman et al. 2016; Fu et al. 2019).

    q(z|x) = N(mu, exp(logvar)) from the encoder's last hidden state; the
    decoder starts from a state computed from z and reads [embedding; z] at
    every step, as in the paper's language-model experiments.
    """

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int = 32,
        hidden_dim: int = 64,
        latent_dim: int = 2,
        dropout: float = 0.0,
        enc_dropout: float | None = None,
        init_range: float | None = None,
    ) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.hidden_dim = hidden_dim
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=PAD_ID)
        # `dropout` acts on the decoder's input embeddings and before the
        # output layer; the encoder's embeddings get `enc_dropout` (default:
        # the same). The paper's recipe drops on the decoder side only.
        self.drop = nn.Dropout(dropout)
        self.enc_drop = nn.Dropout(dropout if enc_dropout is None else enc_dropout)
        self.encoder = nn.LSTM(embed_dim, hidden_dim, batch_first=True)
        self.to_mu = nn.Linear(hidden_dim, latent_dim)
        self.to_logvar = nn.Linear(hidden_dim, latent_dim)
        self.z_to_state = nn.Linear(latent_dim, 2 * hidden_dim)
        self.decoder = nn.LSTM(embed_dim + latent_dim, hidden_dim, batch_first=True)
        self.out = nn.Linear(hidden_dim, vocab_size)
        if init_range is not None:
            # U(-init_range, init_range) for every parameter, as the paper's code does.
            for param in self.parameters():
                nn.init.uniform_(param, -init_range, init_range)

    def encode(self, enc_input: torch.Tensor, lengths: torch.Tensor):
        """mu, logvar [B, D] of q(z|x) for words [B, L] with ``lengths`` [B]."""
        packed = nn.utils.rnn.pack_padded_sequence(
            self.enc_drop(self.embed(enc_input)), lengths, batch_first=True, enforce_sorted=False
        )
        _, (h_n, _) = self.encoder(packed)
        last = h_n[-1]
        return self.to_mu(last), self.to_logvar(last)

    def decode_hidden(self, z: torch.Tensor, dec_input: torch.Tensor) -> torch.Tensor:
        """The output layer's input [B, L+1, H] for teacher-forced ``dec_input`` [B, L+1]."""
        h0, c0 = torch.tanh(self.z_to_state(z)).chunk(2, dim=-1)
        emb = self.drop(self.embed(dec_input))
        steps = torch.cat([emb, z.unsqueeze(1).expand(-1, emb.shape[1], -1)], dim=-1)
        hidden, _ = self.decoder(
            steps, (h0.unsqueeze(0).contiguous(), c0.unsqueeze(0).contiguous())
        )
        return self.drop(hidden)

    def decode(self, z: torch.Tensor, dec_input: torch.Tensor) -> torch.Tensor:
        """Logits [B, L+1, V] of p(x|z) for teacher-forced ``dec_input`` [B, L+1]."""
        return self.out(self.decode_hidden(z, dec_input))

    def features(self, batch: Batch, generator: torch.Generator | None = None):
        """hidden [B, L+1, H] (the input of ``self.out``), mu [B, D], logvar [B, D]:
        ``forward`` without the output layer, for ``klanneal.linear_elbo_loss``
        (the same random draws as ``forward``)."""
        mu, logvar = self.encode(batch.enc_input, batch.lengths)
        eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype)
        z = mu + torch.exp(0.5 * logvar) * eps
        return self.decode_hidden(z, batch.dec_input), mu, logvar

    def forward(self, batch: Batch, generator: torch.Generator | None = None):
        """logits [B, L+1, V], mu [B, D], logvar [B, D] with one reparameterised z per row."""
        hidden, mu, logvar = self.features(batch, generator)
        return self.out(hidden), mu, logvar
