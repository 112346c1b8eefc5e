"""Text VAE with constant, monotonic and cyclical KL annealing (Fu et al., NAACL 2019).

The pieces behind ``examples/text_vae.py`` (``make demo``): toy data and a
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

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import klanneal
import klanneal.schedules

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
IGNORE_INDEX = -100
SCHEDULE_NAMES = ("constant", "monotonic", "cyclical")

# End-of-training values read off the paper's learning-curve figure for its
# synthetic 10-sequence data set (Fu et al. 2019), as quoted in issue 6.
PAPER_TOY = {
    "constant": {"kl": 0.15, "elbo": 2.3},
    "monotonic": {"kl": 0.95, "elbo": 2.3},
    "cyclical": {"kl": 1.6, "elbo": 2.3},
}
# Cov_x(E_q[z_d]) above this makes dimension d "active" (Burda et al. 2016).
ACTIVE_UNIT_THRESHOLD = 0.01


# --------------------------------------------------------------------------- data


@dataclass
class Vocab:
    """Token <-> id map; ids 0..3 are ``<pad> <bos> <eos> <unk>``."""

    words: list[str]
    index: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.index = {w: i for i, w in enumerate(self.words)}

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, tokens: Sequence[str]) -> list[int]:
        """Ids of ``tokens``; words outside the vocabulary map to ``<unk>``."""
        return [self.index.get(t, UNK_ID) for t in tokens]

    @classmethod
    def build(cls, sentences: Sequence[Sequence[str]], max_size: int | None = None) -> Vocab:
        """Vocabulary of the most frequent words (ties broken alphabetically).

        Args:
            sentences: tokenised sentences.
            max_size: at most this many entries, the four specials included;
                None keeps every word.

        Raises:
            ValueError: if ``max_size`` leaves no room for a word.
        """
        if max_size is not None and max_size <= len(SPECIALS):
            raise ValueError(f"max_vocab must be > {len(SPECIALS)} (the specials), got {max_size}")
        counts: dict[str, int] = {}
        for sentence in sentences:
            for token in sentence:
                if token not in SPECIALS:
                    counts[token] = counts.get(token, 0) + 1
        # "<unk>" in the corpus (PTB has it) is the UNK_ID special.
        ranked = sorted(counts, key=lambda w: (-counts[w], w))
        if max_size is not None:
            ranked = ranked[: max_size - len(SPECIALS)]
        return cls(list(SPECIALS) + ranked)


def make_toy_sequences(
    n_sequences: int = 10, length: int = 10, n_words: int = 100, seed: int = 0
) -> torch.Tensor:
    """The toy data set: ``n_sequences`` distinct random sequences, fixed by ``seed``.

    As in the paper's synthetic experiment the sequences are equally likely,
    so the best achievable negative ELBO is ``log(n_sequences)`` nats.

    Returns:
        int64 tensor [n_sequences, length] of word ids in ``[4, 4 + n_words)``
        (ids below 4 are the specials).

    Raises:
        ValueError: if a size is not positive or there are fewer possible
            sequences than ``n_sequences``.
    """
    for name, value in (("n_sequences", n_sequences), ("length", length), ("n_words", n_words)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if n_words**length < n_sequences:
        raise ValueError(
            f"only {n_words}**{length} distinct sequences exist, "
            f"fewer than n_sequences={n_sequences}"
        )
    gen = torch.Generator().manual_seed(seed)
    seen: set[tuple[int, ...]] = set()
    rows = []
    while len(rows) < n_sequences:
        row = torch.randint(len(SPECIALS), len(SPECIALS) + n_words, (length,), generator=gen)
        key = tuple(row.tolist())
        if key not in seen:
            seen.add(key)
            rows.append(row)
    return torch.stack(rows)


def toy_vocab(n_words: int) -> Vocab:
    """Vocabulary of the toy data: the specials plus words ``w0 .. w{n_words-1}``."""
    return Vocab(list(SPECIALS) + [f"w{i}" for i in range(n_words)])


def _find_split(data_dir: Path, split: str) -> Path:
    for name in (f"{split}.txt", f"ptb.{split}.txt"):
        if (data_dir / name).is_file():
            return data_dir / name
    raise FileNotFoundError(
        f"--data {data_dir}: no {split}.txt or ptb.{split}.txt"
        + (
            " (pass --train-split valid to train on the validation split)"
            if split == "train"
            else ""
        )
    )


def read_corpus(
    path: Path,
    max_sentences: int | None = None,
    max_len: int | None = None,
    drop_longer: int | None = None,
):
    """Whitespace-tokenised sentences of a one-sentence-per-line file.

    Empty lines are skipped; sentences longer than ``drop_longer`` tokens are
    dropped (the paper's recipe drops those over 200), then sentences longer
    than ``max_len`` tokens are truncated. The first ``max_sentences``
    sentences are kept (file order, so the slice is deterministic).
    """
    sentences = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            tokens = line.split()
            if not tokens or (drop_longer is not None and len(tokens) > drop_longer):
                continue
            sentences.append(tokens[:max_len] if max_len else tokens)
            if max_sentences is not None and len(sentences) >= max_sentences:
                break
    if not sentences:
        raise ValueError(f"{path} holds no sentences")
    return sentences


@dataclass
class Batch:
    """Tensors for one batch of B sequences of at most L words.

    enc_input [B, L] words, PAD_ID-padded; lengths [B];
    dec_input [B, L+1] = BOS + words; target [B, L+1] = words + EOS, padded
    with IGNORE_INDEX so padding contributes nothing to the loss.
    """

    enc_input: torch.Tensor
    lengths: torch.Tensor
    dec_input: torch.Tensor
    target: torch.Tensor

    @property
    def n_tokens(self) -> int:
        """Predicted tokens (words + EOS), the perplexity's denominator."""
        return int((self.target != IGNORE_INDEX).sum())


def make_batch(sequences: Sequence[Sequence[int]]) -> Batch:
    """Pads id sequences into a :class:`Batch`."""
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.int64)
    if len(sequences) == 0 or int(lengths.min()) < 1:
        raise ValueError("make_batch needs at least one non-empty sequence")
    width = int(lengths.max())
    enc = torch.full((len(sequences), width), PAD_ID, dtype=torch.int64)
    dec = torch.full((len(sequences), width + 1), PAD_ID, dtype=torch.int64)
    tgt = torch.full((len(sequences), width + 1), IGNORE_INDEX, dtype=torch.int64)
    for i, seq in enumerate(sequences):
        ids = torch.as_tensor(list(seq), dtype=torch.int64)
        n = len(ids)
        enc[i, :n] = ids
        dec[i, 0] = BOS_ID
        dec[i, 1 : n + 1] = ids
        tgt[i, :n] = ids
        tgt[i, n] = EOS_ID
    return Batch(enc, lengths, dec, tgt)


def word_dropout(batch: Batch, rate: float, generator: torch.Generator) -> Batch:
    """``batch`` with each decoder input word replaced by ``<unk>`` with probability ``rate``.

    Bowman et al. (2016)'s word dropout: a decoder that cannot always see the
    previous word has more reason to read z. BOS and padding are kept.
    """
    if rate <= 0.0:
        return batch
    drop = torch.rand(batch.dec_input.shape, generator=generator) < rate
    drop &= batch.dec_input > EOS_ID  # words only: not PAD, BOS or EOS
    dec_input = batch.dec_input.masked_fill(drop, UNK_ID)
    return Batch(batch.enc_input, batch.lengths, dec_input, batch.target)


class BatchStream:
    """Endless deterministic mini-batches drawn epoch by epoch with a seeded generator.

    Each epoch shuffles the data; with ``bucket`` it then sorts each run of
    ``bucket`` batches' worth of sequences by length and shuffles the batches
    (similar lengths share a batch, so little compute goes to padding). With
    ``batch_size`` equal to the data size every batch holds all of it.
    """

    def __init__(
        self, sequences: Sequence[Sequence[int]], batch_size: int, seed: int, bucket: int = 0
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.sequences = list(sequences)
        self.batch_size = min(batch_size, len(self.sequences))
        self.bucket = bucket
        self.gen = torch.Generator().manual_seed(seed)
        self.batches: list[list[int]] = []

    def _epoch(self) -> list[list[int]]:
        order = torch.randperm(len(self.sequences), generator=self.gen).tolist()
        if self.bucket > 1:
            span = self.bucket * self.batch_size
            order = [
                i
                for start in range(0, len(order), span)
                for i in sorted(order[start : start + span], key=lambda j: len(self.sequences[j]))
            ]
        # Whole batches only: the remainder of an epoch is dropped.
        batches = [
            order[start : start + self.batch_size]
            for start in range(0, len(order) - self.batch_size + 1, self.batch_size)
        ]
        if self.bucket > 1:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=self.gen)]
        return batches

    @property
    def batches_per_epoch(self) -> int:
        """Whole batches in one pass over the data (the remainder is dropped)."""
        return len(self.sequences) // self.batch_size

    def next(self) -> Batch:
        """The next batch."""
        if not self.batches:
            self.batches = self._epoch()
        picked = self.batches.pop()
        return make_batch([self.sequences[i] for i in picked])

    def state_dict(self) -> dict[str, Any]:
        """Generator state and the rest of the current epoch: resume draws the same batches."""
        return {"gen": self.gen.get_state(), "batches": [list(b) for b in self.batches]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["gen"])
        self.batches = [list(b) for b in state["batches"]]


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

    def decode(self, z: torch.Tensor, dec_input: torch.Tensor) -> torch.Tensor:
        """Logits [B, L+1, V] of p(x|z) for teacher-forced ``dec_input`` [B, L+1]."""
        h0, c0 = torch.tanh(self.z_to_state(z)).chunk(2, dim=-1)
        emb = self.drop(self.embed(dec_input))
        steps = torch.cat([emb, z.unsqueeze(1).expand(-1, emb.shape[1], -1)], dim=-1)
        hidden, _ = self.decoder(
            steps, (h0.unsqueeze(0).contiguous(), c0.unsqueeze(0).contiguous())
        )
        return self.out(self.drop(hidden))

    def forward(self, batch: Batch, generator: torch.Generator | None = None):
        """logits [B, L+1, V], mu [B, D], logvar [B, D] with one reparameterised z per row."""
        mu, logvar = self.encode(batch.enc_input, batch.lengths)
        eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype)
        z = mu + torch.exp(0.5 * logvar) * eps
        return self.decode(z, batch.dec_input), mu, logvar


# --------------------------------------------------------------------------- schedules


def make_schedule(name: str, steps: int, args: argparse.Namespace):
    """The klanneal schedule called ``name`` with the flags in ``args``.

    constant: beta = ``args.beta``; monotonic: one ramp from ``beta_start`` to
    ``beta_stop`` over ``warmup_fraction * steps`` steps, then ``beta_stop``;
    cyclical: ``n_cycles`` cycles over ``steps``, each ramping for ``ratio``
    of the period after ``zero_ratio`` of it at ``beta_start``.
    """
    if name == "constant":
        return klanneal.schedules.Constant(args.beta)
    if name == "monotonic":
        return klanneal.schedules.Monotonic(
            warmup_steps=max(1, round(args.warmup_fraction * steps)),
            start=args.beta_start,
            stop=args.beta_stop,
        )
    if name == "cyclical":
        return klanneal.schedules.Cyclical(
            total_steps=steps,
            n_cycles=args.n_cycles,
            ratio=args.ratio,
            start=args.beta_start,
            stop=args.beta_stop,
            shape=args.shape,
            zero_ratio=args.zero_ratio,
        )
    raise ValueError(f"unknown schedule {name!r}; expected one of {SCHEDULE_NAMES}")


# --------------------------------------------------------------------------- metrics


@dataclass
class Evaluation:
    """Per-sequence averages over a data set (nats per sequence)."""

    recon: float
    kl: float
    elbo: float  # recon + kl at beta = 1 (the negative ELBO, lower is better)
    perplexity: float  # exp(elbo * n_sequences / n_tokens), an upper bound on the true one
    active_units: int
    mutual_info: float
    mu: torch.Tensor  # [N, D] posterior means
    logvar: torch.Tensor  # [N, D]


def active_units(mu: torch.Tensor, threshold: float = ACTIVE_UNIT_THRESHOLD) -> int:
    """Latent dimensions d with Cov_x(E_q[z_d | x]) > ``threshold`` (Burda et al. 2016).

    Args:
        mu: [N, D] posterior means, one row per data point (N >= 2).
    """
    if mu.shape[0] < 2:
        return 0
    return int((mu.var(dim=0, unbiased=False) > threshold).sum())


def _log_normal(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z_i; mu_j, exp(logvar_j)) for every pair: z [S, D], mu/logvar [N, D] -> [S, N]."""
    diff = z.unsqueeze(1) - mu.unsqueeze(0)
    return -0.5 * (
        (diff * diff / logvar.exp().unsqueeze(0)).sum(-1)
        + logvar.sum(-1).unsqueeze(0)
        + mu.shape[1] * math.log(2 * math.pi)
    )


def mutual_info(
    mu: torch.Tensor, logvar: torch.Tensor, samples_per_point: int, generator: torch.Generator
) -> float:
    """I(x; z) under q(x, z) = q(z|x) p_data(x), in nats (Hoffman & Johnson 2016).

    I = E_x E_{q(z|x)} [log q(z|x) - log q(z)] with the aggregate posterior
    q(z) = mean_j q(z|x_j) over the N data points given, estimated with
    ``samples_per_point`` samples of z per point (the estimator of Hoffman &
    Johnson, as used by He et al. 2019 and the cyclical-annealing code). Each
    sample's term is at most log(N), so the estimate lies in
    (-inf, log N]; it is unbiased for the given N points.

    Args:
        mu, logvar: [N, D] posterior parameters of the data points.
    """
    n, d = mu.shape
    total, count = 0.0, 0
    std = torch.exp(0.5 * logvar)
    # Chunks keep the [S, N, D] pairwise tensor small for large N.
    chunk = max(1, 4_000_000 // max(1, n * d))
    rows = torch.arange(n)
    for _ in range(samples_per_point):
        z = mu + std * torch.randn(mu.shape, generator=generator, dtype=mu.dtype)
        for start in range(0, n, chunk):
            log_pair = _log_normal(z[start : start + chunk], mu, logvar)  # [S, N]
            own = rows[start : start + chunk]
            # log q(z_i|x_i) at the same sample as log q(z_i): the noise of the
            # two terms cancels, unlike with the exact entropy for the first.
            log_own = log_pair[torch.arange(len(own)), own]
            log_agg = torch.logsumexp(log_pair, dim=1) - math.log(n)
            total += float((log_own - log_agg).sum())
            count += len(own)
    return total / count


@torch.no_grad()
def evaluate(
    model: TextVAE,
    sequences: Sequence[Sequence[int]],
    *,
    batch_size: int,
    z_samples: int,
    mi_samples: int,
    seed: int,
) -> Evaluation:
    """Reconstruction, KL, ELBO, perplexity, active units and MI over ``sequences``.

    The loss terms come from ``klanneal.elbo_loss`` at beta = 1, averaged over
    ``z_samples`` draws of z per sequence.
    """
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    recon = kl = 0.0
    n_tokens = 0
    mus, logvars = [], []
    # Sorted by length: batches of similar lengths waste little on padding.
    sequences = sorted(sequences, key=len)
    for start in range(0, len(sequences), batch_size):
        batch = make_batch(sequences[start : start + batch_size])
        n_tokens += batch.n_tokens
        for sample in range(z_samples):
            logits, mu, logvar = model(batch, gen)
            out = klanneal.elbo_loss(
                logits,
                batch.target,
                mu,
                logvar,
                beta=1.0,
                reduction="sum",
                ignore_index=IGNORE_INDEX,
            )
            recon += float(out.recon) / z_samples
            kl += float(out.kl) / z_samples
            if sample == 0:
                mus.append(mu)
                logvars.append(logvar)
    model.train(was_training)
    n = len(sequences)
    mu_all, logvar_all = torch.cat(mus), torch.cat(logvars)
    return Evaluation(
        recon=recon / n,
        kl=kl / n,
        elbo=(recon + kl) / n,
        perplexity=math.exp((recon + kl) / n_tokens),
        active_units=active_units(mu_all),
        mutual_info=(
            mutual_info(mu_all, logvar_all, mi_samples, gen) if mi_samples > 0 else math.nan
        ),
        mu=mu_all,
        logvar=logvar_all,
    )


# --------------------------------------------------------------------------- training


class ProgressBar:
    """A one-line progress bar with rate and ETA (redrawn in place on a terminal).

    Off a terminal (a log file, a parallel worker) it writes a new line every
    ``1 / lines`` of the run.
    """

    def __init__(self, label: str, total: int, stream=None, start: int = 0, lines: int = 10):
        self.label, self.total = label, total
        self.stream = stream if stream is not None else sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.perf_counter()
        self.first = start  # steps already done when this bar started (a resume)
        self.lines = lines
        self.last_drawn = -1

    def update(self, done: int, note: str = "") -> None:
        """Redraws at most 100 times on a terminal (``lines`` lines otherwise)."""
        buckets = 100 if self.tty else self.lines
        bucket = done * buckets // max(1, self.total)
        if bucket == self.last_drawn and done != self.total:
            return
        self.last_drawn = bucket
        width = 24
        filled = done * width // max(1, self.total)
        elapsed = time.perf_counter() - self.start
        rate = (done - self.first) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        line = (
            f"{self.label:>10} [{'#' * filled}{'.' * (width - filled)}] "
            f"{done}/{self.total} {elapsed:6.0f}s {rate:5.2f} it/s ETA {_duration(eta)} {note}"
        )
        if self.tty:
            self.stream.write("\r" + line + ("\n" if done >= self.total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--:--"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


@dataclass
class RunResult:
    """One schedule's training curves and final evaluation."""

    name: str
    curves: dict[str, list[float]]  # step, beta, lr, recon, kl, elbo (training batches)
    final: Evaluation
    seconds: float
    # step, recon, kl, elbo, active_units on the validation sequences (empty without them)
    valid_curves: dict[str, list[float]] = field(default_factory=dict)


def make_lr_scheduler(name: str, optimizer: torch.optim.Optimizer, schedule, args):
    """The learning-rate scheduler of run ``name`` (None: a constant learning rate).

    ``--lr-schedule cyclical-cosine`` restarts a cosine decay at every beta
    cycle (``klanneal.schedules.CyclicalCosineLR``, the paper's recipe);
    ``auto`` does so for the cyclical schedule under ``--recipe fu2019``.
    """
    kind = args.lr_schedule
    if kind == "auto":
        kind = "cyclical-cosine" if args.recipe == "fu2019" and name == "cyclical" else "constant"
    if kind == "constant":
        return None
    if not isinstance(schedule, klanneal.schedules.Cyclical):
        raise ValueError(f"--lr-schedule {kind} needs the cyclical schedule's cycles, not {name}")
    return klanneal.schedules.CyclicalCosineLR(optimizer, schedule, min_factor=args.lr_min_factor)


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def _eval_points(steps: int, n: int) -> set[int]:
    """The steps after which the validation curve is measured (the last one included)."""
    if n <= 0:
        return set()
    return {max(1, round(steps * (i + 1) / n)) for i in range(n)}


def train_one(
    name: str,
    train_seqs: Sequence[Sequence[int]],
    eval_seqs: Sequence[Sequence[int]],
    vocab_size: int,
    args: argparse.Namespace,
    quiet: bool = False,
    valid_seqs: Sequence[Sequence[int]] | None = None,
    run_dir: Path | None = None,
    stream=None,
) -> RunResult | None:
    """Trains a fresh model (same seed for every schedule) and evaluates it.

    With ``run_dir`` a checkpoint (model, optimizer, schedulers, every random
    generator and the curves so far) is written there every
    ``args.checkpoint_every`` seconds and at the end of training, and with
    ``args.resume`` a run continues from it exactly. ``args.stop_after``
    stops after that many steps in this call (checkpoint written, returns
    None). ``valid_seqs``, when given, are evaluated ``args.valid_points``
    times over training (the validation learning curves).
    """
    torch.manual_seed(args.seed)
    model = TextVAE(
        vocab_size,
        args.embed_dim,
        args.hidden_dim,
        args.latent_dim,
        args.dropout,
        enc_dropout=args.enc_dropout,
        init_range=args.init_range,
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    schedule = make_schedule(name, args.steps, args)
    lr_scheduler = make_lr_scheduler(name, optimizer, schedule, args)
    batches = BatchStream(train_seqs, args.batch_size, args.seed, bucket=args.bucket)
    z_gen = torch.Generator().manual_seed(args.seed + 1)
    drop_gen = torch.Generator().manual_seed(args.seed + 3)
    keys = ("step", "beta", "lr", "recon", "kl", "elbo")
    curves: dict[str, list[float]] = {k: [] for k in keys}
    valid_curves: dict[str, list[float]] = {
        k: [] for k in ("step", "recon", "kl", "elbo", "active_units")
    }
    first_step, seconds_before = 0, 0.0
    ckpt = run_dir / "checkpoint.pt" if run_dir is not None else None
    if ckpt is not None and args.resume and ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        if state["config"] != _run_config(name, args):
            raise ValueError(
                f"{ckpt} was written by a run with other flags; drop --resume or use another --out"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if lr_scheduler is not None:
            lr_scheduler.load_state_dict(state["lr_scheduler"])
        batches.load_state_dict(state["batches"])
        z_gen.set_state(state["z_gen"])
        drop_gen.set_state(state["drop_gen"])
        torch.set_rng_state(state["torch_rng"])
        curves, valid_curves = state["curves"], state["valid_curves"]
        first_step, seconds_before = state["step"], state["seconds"]

    def checkpoint(step: int, seconds: float) -> None:
        if ckpt is None:
            return
        _save_atomic(
            {
                "config": _run_config(name, args),
                "step": step,
                "seconds": seconds,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "lr_scheduler": None if lr_scheduler is None else lr_scheduler.state_dict(),
                "batches": batches.state_dict(),
                "z_gen": z_gen.get_state(),
                "drop_gen": drop_gen.get_state(),
                "torch_rng": torch.get_rng_state(),
                "curves": curves,
                "valid_curves": valid_curves,
            },
            ckpt,
        )

    points = _eval_points(args.steps, args.valid_points) if valid_seqs else set()
    bar = None if quiet else ProgressBar(name, args.steps, stream=stream, start=first_step)
    start = time.perf_counter()
    last_ckpt = start
    stop = args.steps if args.stop_after is None else min(args.steps, first_step + args.stop_after)
    model.train()
    for step in range(first_step, stop):
        batch = word_dropout(batches.next(), args.word_dropout, drop_gen)
        logits, mu, logvar = model(batch, z_gen)
        # The fused op evaluates the schedule at `step` itself: no beta is
        # computed by hand anywhere in this loop.
        out = klanneal.elbo_loss(
            logits,
            batch.target,
            mu,
            logvar,
            beta=schedule,
            step=step,
            reduction="batchmean",
            ignore_index=IGNORE_INDEX,
        )
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if args.clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        if lr_scheduler is not None:
            lr_scheduler.step()
        recon, kl = float(out.recon), float(out.kl)
        for key, value in (
            ("step", step),
            ("beta", float(out.beta)),
            ("lr", lr),
            ("recon", recon),
            ("kl", kl),
            ("elbo", recon + kl),
        ):
            curves[key].append(value)
        if step + 1 in points:
            v = evaluate(
                model,
                valid_seqs,
                batch_size=args.eval_batch_size,
                z_samples=1,
                mi_samples=0,
                seed=args.seed + 4,
            )
            for key, value in (
                ("step", step + 1),
                ("recon", v.recon),
                ("kl", v.kl),
                ("elbo", v.elbo),
                ("active_units", v.active_units),
            ):
                valid_curves[key].append(value)
        if bar is not None:
            bar.update(
                step + 1,
                f"beta {float(out.beta):.2f} lr {lr:.1e} rec {recon:7.3f} kl {kl:6.3f}",
            )
        now = time.perf_counter()
        if ckpt is not None and now - last_ckpt >= args.checkpoint_every:
            checkpoint(step + 1, seconds_before + now - start)
            last_ckpt = now
    seconds = seconds_before + time.perf_counter() - start
    checkpoint(stop, seconds)
    if stop < args.steps:
        return None
    final = evaluate(
        model,
        eval_seqs,
        batch_size=args.eval_batch_size,
        z_samples=args.eval_samples,
        mi_samples=args.mi_samples,
        seed=args.seed + 2,
    )
    return RunResult(name, curves, final, seconds, valid_curves)


def _run_config(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """The flags that decide a run's numbers (a checkpoint only resumes the same run)."""
    skip = {"out", "resume", "stop_after", "quiet", "jobs", "schedules", "checkpoint_every"}
    return {"schedule": name, **{k: v for k, v in vars(args).items() if k not in skip}}


def run_schedule(
    name: str,
    data: tuple,
    args: argparse.Namespace,
    out_dir: Path,
    quiet: bool = False,
    log_to_file: bool = False,
    reuse: bool = False,
) -> RunResult | None:
    """Trains one schedule under ``out_dir/runs/NAME/`` (checkpoint, result) and returns it.

    A finished run's ``result.pt`` (of the same flags) is reused when resuming
    or with ``reuse`` (the parent collecting what its ``--jobs`` workers wrote).
    """
    train, evals, valid, vocab_size = data
    run_dir = out_dir / "runs" / name
    run_dir.mkdir(parents=True, exist_ok=True)
    result_path = run_dir / "result.pt"
    if (args.resume or reuse) and result_path.is_file():
        saved = torch.load(result_path, weights_only=False)
        if saved["config"] == _run_config(name, args):
            return saved["result"]
    if reuse:
        raise RuntimeError(f"{result_path}: the worker of schedule {name} left no result")
    stream = open(run_dir / "progress.log", "a") if log_to_file else None
    try:
        result = train_one(
            name,
            train,
            evals,
            vocab_size,
            args,
            quiet=quiet,
            valid_seqs=valid,
            run_dir=run_dir,
            stream=stream,
        )
    finally:
        if stream is not None:
            stream.close()
    if result is not None:
        _save_atomic({"config": _run_config(name, args), "result": result}, result_path)
    return result


def _worker(name: str, args: argparse.Namespace, out_dir: str) -> bool:
    """One schedule in a worker process (``--jobs``): loads the data, trains, saves."""
    torch.set_num_threads(args.threads)
    data = load_data(args)
    return run_schedule(name, data, args, Path(out_dir), log_to_file=True) is not None


# --------------------------------------------------------------------------- reporting


def _smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average (the curves of single mini-batches are noisy)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:  # pragma: no cover - matplotlib is in the bench extra
        raise RuntimeError(
            "the demo's figures need matplotlib: pip install 'klanneal[bench]'"
        ) from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(
    results: Sequence[RunResult], path: Path, title: str, optimum: float | None
) -> None:
    """Learning curves of -ELBO, reconstruction, KL and beta (as in the paper)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    steps = max(len(r.curves["step"]) for r in results)
    # Corpus batches differ in sentence length (nats per sequence swing with
    # it), so their curves need a wider window than the toy's full batches.
    window = max(1, steps // (100 if optimum is not None else 25))
    panels = (
        ("elbo", "-ELBO (rec + KL, beta = 1)"),
        ("recon", "reconstruction"),
        ("kl", "KL"),
        ("beta", "beta"),
    )
    for ax, (key, label) in zip(axes, panels):
        for r in results:
            values = r.curves[key] if key == "beta" else _smooth(r.curves[key], window)
            ax.plot(r.curves["step"], values, label=r.name, linewidth=1.2)
        if key in ("elbo", "recon"):
            # The first steps (tens of nats) would flatten the part that matters.
            settled = [v for r in results for v in _smooth(r.curves[key], window)[steps // 10 :]]
            if settled:
                ax.set_ylim(0, 1.2 * max(settled))
        if key == "elbo" and optimum is not None:
            ax.axhline(optimum, color="gray", linestyle=":", label=f"log N = {optimum:.3f}")
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_valid_curves(results: Sequence[RunResult], path: Path, title: str, split: str) -> None:
    """-ELBO, reconstruction and KL on the validation split over training, beta and lr."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 5, figsize=(20, 3.6))
    panels = (
        ("elbo", f"-ELBO on {split}"),
        ("recon", f"reconstruction on {split}"),
        ("kl", f"KL on {split}"),
        ("beta", "beta (training)"),
        ("lr", "learning rate (training)"),
    )
    for ax, (key, label) in zip(axes, panels):
        for r in results:
            if key in ("beta", "lr"):
                ax.plot(r.curves["step"], r.curves.get(key, []), label=r.name, linewidth=1.0)
            else:
                ax.plot(r.valid_curves["step"], r.valid_curves[key], marker=".", label=r.name)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_latent(
    results: Sequence[RunResult], path: Path, samples: int, seed: int, title: str
) -> None:
    """Posterior samples and means of each sequence in 2-D, one panel per schedule.

    With a 1- or 2-D latent the axes are z's dimensions; otherwise a PCA of the
    posterior means (computed per schedule) projects means and samples.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 4), squeeze=False)
    gen = torch.Generator().manual_seed(seed)
    cmap = plt.get_cmap("tab10")
    for ax, r in zip(axes[0], results):
        mu, logvar = r.final.mu, r.final.logvar
        n, d = mu.shape
        z = mu.unsqueeze(1) + torch.exp(0.5 * logvar).unsqueeze(1) * torch.randn(
            (n, samples, d), generator=gen
        )
        if d <= 2:
            # eye(1, 2) draws a 1-D latent along the x axis.
            centre, basis = torch.zeros(d), torch.eye(d, 2)
            xlabel, ylabel = "z1", "z2"
        else:
            centre = mu.mean(0)
            _, _, v = torch.linalg.svd(mu - centre, full_matrices=False)
            basis = v[:2].T
            xlabel, ylabel = "PC1 of posterior means", "PC2"
        for i in range(n):
            pts = (z[i] - centre) @ basis
            ax.scatter(pts[:, 0], pts[:, 1], s=4, alpha=0.35, color=cmap(i % 10))
            m = (mu[i : i + 1] - centre) @ basis
            ax.scatter(m[:, 0], m[:, 1], s=60, marker="x", color=cmap(i % 10))
        ax.set_title(f"{r.name}: KL {r.final.kl:.2f}, MI {r.final.mutual_info:.2f}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def summarise(results: Sequence[RunResult], args: argparse.Namespace, toy: bool) -> dict[str, Any]:
    """Machine-readable summary: config, per-schedule metrics, paper values, ordering check."""
    schedules = {}
    for r in results:
        f = r.final
        schedules[r.name] = {
            "recon": f.recon,
            "kl": f.kl,
            "elbo": f.elbo,
            "perplexity": f.perplexity,
            "active_units": f.active_units,
            "latent_dim": args.latent_dim,
            "mutual_info": f.mutual_info,
            "final_beta": r.curves["beta"][-1] if r.curves["beta"] else None,
            "train_seconds": r.seconds,
            # The names the paper's table uses (issue 13's summary format).
            "rec": f.recon,
            "nelbo": f.elbo,
            "ppl": f.perplexity,
            "au": f.active_units,
            "mi": f.mutual_info,
            "epochs": args.epochs,
            "steps": args.steps,
            "seconds": r.seconds,
            "seed": args.seed,
            "lr_schedule": _lr_kind(r.name, args),
        }
        if toy:
            schedules[r.name]["paper"] = PAPER_TOY[r.name]
    kls = {name: s["kl"] for name, s in schedules.items()}
    ordering = None
    if all(n in kls for n in SCHEDULE_NAMES):
        ordering = kls["cyclical"] > kls["monotonic"] > kls["constant"]
    return {
        "mode": "toy" if toy else "corpus",
        "recipe": args.recipe,
        "train_split": None if toy else args.train_split,
        "eval_split": None if toy else args.eval_split,
        "valid_split": None if toy else args.valid_split,
        "git_sha": git_sha(),
        "command": " ".join(["python", *sys.argv]) if sys.argv and sys.argv[0] else None,
        "config": {k: v for k, v in vars(args).items() if k != "func"},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "optimum_elbo": math.log(args.n_sequences) if toy else None,
        "schedules": schedules,
        "kl_order_cyclical_gt_monotonic_gt_constant": ordering,
    }


def _lr_kind(name: str, args: argparse.Namespace) -> str:
    if args.lr_schedule != "auto":
        return args.lr_schedule
    return "cyclical-cosine" if args.recipe == "fu2019" and name == "cyclical" else "constant"


def format_table(summary: dict[str, Any]) -> str:
    """The result table as markdown (the paper's toy values beside ours in toy mode)."""
    toy = summary["mode"] == "toy"
    if toy:
        head = "| schedule | rec | KL | -ELBO | AU | MI | paper KL | paper -ELBO |"
        rule = "|---|---:|---:|---:|---:|---:|---:|---:|"
    else:
        head = "| schedule | rec | KL | -ELBO | PPL | AU | MI |"
        rule = "|---|---:|---:|---:|---:|---:|---:|"
    lines = [head, rule]
    for name, s in summary["schedules"].items():
        au = f"{s['active_units']}/{s['latent_dim']}"
        row = f"| {name} | {_fmt(s['recon'])} | {_fmt(s['kl'])} | {_fmt(s['elbo'])} | "
        if toy:
            paper = s["paper"]
            row += f"{au} | {_fmt(s['mutual_info'])} | {paper['kl']} | {paper['elbo']} |"
        else:
            row += f"{_fmt(s['perplexity'], 2)} | {au} | {_fmt(s['mutual_info'])} |"
        lines.append(row)
    return "\n".join(lines)


def ordering_sentence(summary: dict[str, Any]) -> str:
    """States whether KL cyclical > monotonic > constant held in this run."""
    held = summary["kl_order_cyclical_gt_monotonic_gt_constant"]
    if held is None:
        return "KL ordering: not checked (needs all three schedules)."
    kls = {n: summary["schedules"][n]["kl"] for n in SCHEDULE_NAMES}
    order = " > ".join(sorted(kls, key=lambda n: -kls[n]))
    verdict = "HELD" if held else "did NOT hold"
    return (
        f"KL ordering cyclical > monotonic > constant (the paper's): {verdict} in this run "
        f"(observed {order})."
    )


def write_outputs(
    results: Sequence[RunResult], args: argparse.Namespace, toy: bool, out_dir: Path
) -> dict[str, Any]:
    """summary.json, summary.md, curves.json and the PNG figures under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarise(results, args, toy)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / "curves.json").write_text(
        json.dumps(
            {r.name: {**r.curves, "valid": r.valid_curves} for r in results},
            separators=(",", ":"),
        )
        + "\n"
    )
    what = (
        f"toy data: {args.n_sequences} sequences x {args.seq_len} words"
        if toy
        else f"corpus {args.data} (train split {args.train_split}, eval split {args.eval_split})"
    )
    budget = f"{args.epochs:g} epochs = " if args.epochs is not None else ""
    recipe = f"recipe {args.recipe}; " if args.recipe != "none" else ""
    title = f"{what}; {recipe}{budget}{args.steps} steps, seed {args.seed}"
    plot_curves(results, out_dir / "learning_curves.png", title, summary["optimum_elbo"])
    figures = ["learning_curves.png"]
    if any(r.valid_curves.get("step") for r in results):
        plot_valid_curves(results, out_dir / "valid_curves.png", title, args.valid_split)
        figures.append("valid_curves.png")
    if toy:
        plot_latent(results, out_dir / "latent_space.png", 200, args.seed, title)
        figures.append("latent_space.png")
    lines = [
        "# klanneal text-VAE demo",
        "",
        f"{title}. Numbers in nats per sequence, "
        + (
            "on the training data (the toy data set is the whole distribution)."
            if toy
            else f"on the {args.eval_split} split."
        ),
        "",
        format_table(summary),
        "",
    ]
    if toy:
        lines += [
            f"Best possible -ELBO: log({args.n_sequences}) = {summary['optimum_elbo']:.3f}. "
            "AU = active units (Cov(E_q[z_d]) > 0.01); MI = I(x; z) in nats "
            f"(at most {summary['optimum_elbo']:.3f}). "
            "Paper values: end of training in the learning-curve figure of Fu et al. (2019).",
            "",
            ordering_sentence(summary),
            "",
        ]
    else:
        lines += [
            "PPL = exp(-ELBO / tokens) (an upper bound; tokens include <eos>). "
            "AU = active units (Cov(E_q[z_d]) > 0.01); MI = I(x; z) in nats.",
            "",
        ]
    lines += [f"![{f}]({f})" for f in figures] + [""]
    (out_dir / "summary.md").write_text("\n".join(lines))
    return summary


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags (every schedule parameter is one)."""
    p = argparse.ArgumentParser(
        description="Train a text VAE with constant, monotonic and cyclical KL annealing "
        "(klanneal's schedules and fused ELBO loss) and compare them.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("run")
    g.add_argument("--out", default="demo_output", help="output directory")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    g.add_argument("--schedules", nargs="+", default=list(SCHEDULE_NAMES), choices=SCHEDULE_NAMES)
    g.add_argument(
        "--steps",
        type=int,
        default=None,
        help="optimizer steps per schedule (default: 3000 toy, 2000 corpus)",
    )
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument(
        "--recipe",
        default="none",
        choices=RECIPES,
        help="fu2019: the paper's language-model recipe (model, optimiser, schedules and "
        "learning-rate restarts; every piece can still be overridden by its flag)",
    )
    g.add_argument(
        "--epochs",
        type=float,
        default=None,
        help="train for this many passes over the training data (fractional allowed; "
        "overrides --steps; the cycle structure scales with it)",
    )
    g.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="train this many schedules at once in worker processes (each with --threads "
        "threads; progress in OUT/runs/NAME/progress.log)",
    )
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue from the checkpoints under --out (finished schedules are reused)",
    )
    g.add_argument(
        "--checkpoint-every",
        type=float,
        default=300.0,
        help="seconds between checkpoints (OUT/runs/NAME/checkpoint.pt)",
    )
    g.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="stop each schedule after this many steps in this call (checkpoint written; "
        "continue with --resume)",
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        default=None,
        help="corpus directory (train/valid/test .txt, "
        "or ptb.*.txt); omitted: the built-in toy data",
    )
    g.add_argument("--train-split", default="train", choices=("train", "valid"))
    g.add_argument("--eval-split", default="test", choices=("valid", "test"))
    g.add_argument(
        "--valid-split",
        default=None,
        choices=("valid", "none"),
        help="split for the validation learning curves (default: valid with --recipe "
        "fu2019 when it is not the training split, else none)",
    )
    g.add_argument(
        "--valid-points",
        type=int,
        default=20,
        help="validation evaluations over training (the learning curves' points)",
    )
    g.add_argument("--max-sentences", type=int, default=None, help="train on the first N")
    g.add_argument("--max-eval-sentences", type=int, default=None, help="evaluate on the first N")
    g.add_argument(
        "--max-vocab",
        type=int,
        default=None,
        help="vocabulary size incl. specials (0: every word; default 10000, fu2019: 0)",
    )
    g.add_argument("--max-len", type=int, default=None, help="truncate longer sentences")
    g.add_argument(
        "--drop-longer",
        type=int,
        default=None,
        help="drop sentences longer than this many tokens (fu2019: 200)",
    )
    g.add_argument("--n-sequences", type=int, default=10, help="toy: number of sequences")
    g.add_argument("--seq-len", type=int, default=10, help="toy: words per sequence")
    g.add_argument("--n-words", type=int, default=100, help="toy: vocabulary (without specials)")
    g = p.add_argument_group("model and optimiser")
    g.add_argument("--embed-dim", type=int, default=None, help="default: 32 toy, 128 corpus")
    g.add_argument("--hidden-dim", type=int, default=None, help="default: 64 toy, 256 corpus")
    g.add_argument("--latent-dim", type=int, default=None, help="default: 2 toy, 32 corpus")
    g.add_argument(
        "--dropout",
        type=float,
        default=None,
        help="dropout on the decoder's input embeddings and before the output layer "
        "(default: 0 toy, 0.3 corpus, 0.5 fu2019)",
    )
    g.add_argument(
        "--enc-dropout",
        type=float,
        default=None,
        help="dropout on the encoder's embeddings (default: --dropout; fu2019: 0)",
    )
    g.add_argument(
        "--init-range",
        type=float,
        default=None,
        help="initialise every parameter U(-r, r) (default: torch's; fu2019: 0.1)",
    )
    g.add_argument(
        "--word-dropout",
        type=float,
        default=0.0,
        help="training only: replace decoder input words by <unk> with this probability",
    )
    g.add_argument("--lr", type=float, default=1e-3, help="(peak) learning rate")
    g.add_argument(
        "--lr-schedule",
        default="auto",
        choices=("auto", "constant", "cyclical-cosine"),
        help="cyclical-cosine: restart a cosine decay at every beta cycle "
        "(klanneal.schedules.CyclicalCosineLR); auto: that for the cyclical schedule "
        "under --recipe fu2019, constant otherwise",
    )
    g.add_argument(
        "--lr-min-factor",
        type=float,
        default=0.0,
        help="cyclical-cosine: learning rate at a cycle's end, as a fraction of the peak",
    )
    g.add_argument("--batch-size", type=int, default=None, help="default: 10 toy, 32 corpus")
    g.add_argument(
        "--bucket",
        type=int,
        default=None,
        help="sort runs of this many batches by length (0: off; default 0 toy, 20 corpus)",
    )
    g.add_argument("--clip", type=float, default=5.0, help="gradient-norm clip (0: off)")
    g = p.add_argument_group("schedules (klanneal.schedules)")
    g.add_argument("--beta", type=float, default=1.0, help="constant schedule's beta")
    g.add_argument(
        "--beta-start",
        type=float,
        default=None,
        help="value at a ramp's start (default 0; fu2019: 0.1)",
    )
    g.add_argument("--beta-stop", type=float, default=1.0, help="value at a ramp's end")
    g.add_argument(
        "--warmup-fraction",
        type=float,
        default=0.25,
        help="monotonic: fraction of the steps spent ramping",
    )
    g.add_argument("--n-cycles", type=int, default=4, help="cyclical: number of cycles M")
    g.add_argument(
        "--ratio", type=float, default=0.5, help="cyclical: fraction R of each cycle spent ramping"
    )
    g.add_argument(
        "--zero-ratio",
        type=float,
        default=0.0,
        help="cyclical: fraction of each cycle held at beta-start first",
    )
    g.add_argument(
        "--shape",
        default="linear",
        choices=("linear", "sigmoid", "cosine"),
        help="cyclical: ramp shape",
    )
    g = p.add_argument_group("evaluation")
    g.add_argument(
        "--eval-samples",
        type=int,
        default=None,
        help="z samples per sequence for rec/KL (default: 50 toy, 1 corpus)",
    )
    g.add_argument(
        "--mi-samples",
        type=int,
        default=None,
        help="z samples per sequence for MI (default: 200 toy, 1 corpus)",
    )
    g.add_argument("--eval-batch-size", type=int, default=256)
    return p


TOY_DEFAULTS = {
    "steps": 3000,
    "embed_dim": 32,
    "hidden_dim": 64,
    "latent_dim": 2,
    "dropout": 0.0,
    "batch_size": 10,
    "bucket": 0,
    "eval_samples": 50,
    "mi_samples": 200,
    "beta_start": 0.0,
    "max_vocab": 10000,
}
CORPUS_DEFAULTS = {
    "steps": 2000,
    "embed_dim": 128,
    "hidden_dim": 128,
    "latent_dim": 32,
    "dropout": 0.3,
    "batch_size": 32,
    "bucket": 20,
    "eval_samples": 1,
    "mi_samples": 1,
    "beta_start": 0.0,
    "max_vocab": 10000,
}
RECIPES = ("none", "fu2019")
# Fu et al. (2019)'s language-model recipe, read from their released code.
# Flags given explicitly win over these; the corpus defaults fill the rest.
FU2019 = {
    "embed_dim": 256,
    "hidden_dim": 256,
    "latent_dim": 32,
    "dropout": 0.5,
    "enc_dropout": 0.0,
    "init_range": 0.1,
    "batch_size": 32,
    "bucket": 10**9,  # the whole epoch sorted by length, then its batches shuffled
    "drop_longer": 200,
    "max_vocab": 0,  # PTB's 10k words are already the vocabulary
    "beta_start": 0.1,
    "epochs": 40.0,
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses and validates flags, filling mode-dependent defaults.

    Raises:
        SystemExit: (argparse's error) on a missing or out-of-range value.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.recipe == "fu2019":
        if args.data is None:
            parser.error("--recipe fu2019 trains on a corpus: pass --data DIR")
        for key, value in FU2019.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    defaults = TOY_DEFAULTS if args.data is None else CORPUS_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.max_vocab == 0:
        args.max_vocab = None
    if args.valid_split is None:
        use_valid = args.recipe == "fu2019" and args.train_split != "valid"
        args.valid_split = "valid" if use_valid else "none"
    if args.valid_split != "none" and args.data is None:
        parser.error("--valid-split needs --data (the toy data has no validation split)")
    if args.epochs is not None:
        if not (math.isfinite(args.epochs) and args.epochs > 0):
            parser.error(f"--epochs must be > 0, got {args.epochs}")
        if args.data is None:
            parser.error("--epochs needs --data (the toy run counts --steps)")
    positive = (
        "steps",
        "embed_dim",
        "hidden_dim",
        "latent_dim",
        "batch_size",
        "threads",
        "eval_samples",
        "mi_samples",
        "eval_batch_size",
        "n_cycles",
        "n_sequences",
        "seq_len",
        "n_words",
        "jobs",
    )
    for key in positive:
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.bucket < 0:
        parser.error(f"--bucket must be >= 0, got {args.bucket}")
    if not args.clip >= 0:
        parser.error(f"--clip must be >= 0 (0: off), got {args.clip}")
    if args.max_vocab is not None and args.max_vocab <= len(SPECIALS):
        parser.error(
            f"--max-vocab must be > {len(SPECIALS)} (the specials) or 0, got {args.max_vocab}"
        )
    if args.valid_points < 0:
        parser.error(f"--valid-points must be >= 0, got {args.valid_points}")
    if not args.checkpoint_every > 0:
        parser.error(f"--checkpoint-every must be > 0 seconds, got {args.checkpoint_every}")
    if args.enc_dropout is not None and not 0.0 <= args.enc_dropout < 1.0:
        parser.error(f"--enc-dropout must be in [0, 1), got {args.enc_dropout}")
    if args.init_range is not None and not args.init_range > 0:
        parser.error(f"--init-range must be > 0, got {args.init_range}")
    if not 0.0 <= args.lr_min_factor <= 1.0:
        parser.error(f"--lr-min-factor must be in [0, 1], got {args.lr_min_factor}")
    if args.lr_schedule == "cyclical-cosine" and args.schedules != ["cyclical"]:
        parser.error(
            "--lr-schedule cyclical-cosine follows the cyclical schedule's cycles: "
            "use it with --schedules cyclical (auto restarts only the cyclical run)"
        )
    for key in ("max_sentences", "max_eval_sentences", "max_len", "stop_after", "drop_longer"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.n_sequences < 2 and args.data is None:
        parser.error("--n-sequences must be >= 2 (active units and MI compare sequences)")
    if not 0.0 <= args.dropout < 1.0:
        parser.error(f"--dropout must be in [0, 1), got {args.dropout}")
    if not 0.0 <= args.word_dropout <= 1.0:
        parser.error(f"--word-dropout must be in [0, 1], got {args.word_dropout}")
    if not args.lr > 0:
        parser.error(f"--lr must be > 0, got {args.lr}")
    if not 0.0 < args.warmup_fraction <= 1.0:
        parser.error(f"--warmup-fraction must be in (0, 1], got {args.warmup_fraction}")
    if args.epochs is not None:
        # The exact count needs the data (steps per epoch); a placeholder
        # validates the schedule flags now, load_data sets the real one.
        args.steps = None
    # klanneal.schedules validates the rest (ratio, zero-ratio, shape, ...).
    for name in args.schedules if args.steps is not None else ():
        try:
            make_schedule(name, args.steps, args)
        except ValueError as err:
            parser.error(f"{name} schedule: {err}")
    return args


def load_data(args: argparse.Namespace):
    """(train, eval, valid id sequences, vocabulary size) for the chosen mode.

    ``valid`` is None without a validation split. With ``--epochs`` this also
    sets ``args.steps`` (whole batches per epoch times the epochs, rounded).
    """
    if args.data is None:
        seqs = make_toy_sequences(args.n_sequences, args.seq_len, args.n_words, args.seed)
        rows = [row.tolist() for row in seqs]
        # The toy data set is the whole distribution: train and evaluate on it.
        return rows, rows, None, len(toy_vocab(args.n_words))
    data_dir = Path(args.data)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"--data {data_dir}: not a directory")

    def read(split: str, limit: int | None):
        return read_corpus(_find_split(data_dir, split), limit, args.max_len, args.drop_longer)

    train = read(args.train_split, args.max_sentences)
    evals = read(args.eval_split, args.max_eval_sentences)
    valid = None if args.valid_split == "none" else read(args.valid_split, args.max_eval_sentences)
    vocab = Vocab.build(train, args.max_vocab)
    if args.epochs is not None:
        per_epoch = len(train) // min(args.batch_size, len(train))
        args.steps = max(1, round(args.epochs * per_epoch))
        for name in args.schedules:
            make_schedule(name, args.steps, args)  # raises ValueError on a bad flag
    encode = vocab.encode
    return (
        [encode(s) for s in train],
        [encode(s) for s in evals],
        None if valid is None else [encode(s) for s in valid],
        len(vocab),
    )


def git_sha() -> str | None:
    """The checkout's commit (with ``-dirty`` for uncommitted changes), or None."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha + ("-dirty" if dirty else "")


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Runs the comparison and writes the outputs; returns the summary dict.

    Returns None when ``--stop-after`` stopped the runs early (resume them
    with ``--resume``).
    """
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    toy = args.data is None
    data = load_data(args)
    train, evals, valid, vocab_size = data
    print(
        f"klanneal {klanneal.__version__} text-VAE demo"
        + (f" (recipe {args.recipe})" if args.recipe != "none" else "")
        + ": "
        + (
            f"toy data, {len(train)} sequences x {args.seq_len} words"
            if toy
            else f"{args.data}: {len(train)} train / {len(evals)} eval"
            + (f" / {len(valid)} valid" if valid else "")
            + f" sentences, vocabulary {vocab_size}"
        )
        + f"; {args.steps} steps per schedule"
        + (f" ({args.epochs:g} epochs)" if args.epochs is not None else "")
        + f", seed {args.seed}, {args.threads} thread(s)",
        flush=True,
    )
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.jobs > 1 and len(args.schedules) > 1:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        jobs = min(args.jobs, len(args.schedules))
        print(
            f"training {len(args.schedules)} schedules in {jobs} processes; "
            f"progress: {out_dir}/runs/*/progress.log",
            flush=True,
        )
        with ctx.Pool(jobs) as pool:
            done = pool.starmap(_worker, [(n, args, str(out_dir)) for n in args.schedules])
        if not all(done):
            print(f"stopped early (--stop-after); continue with --resume --out {out_dir}")
            return None
        results = [
            run_schedule(name, data, args, out_dir, quiet=True, reuse=True)
            for name in args.schedules
        ]
    else:
        results = [
            run_schedule(name, data, args, out_dir, quiet=args.quiet) for name in args.schedules
        ]
        if any(r is None for r in results):
            print(f"stopped early (--stop-after); continue with --resume --out {out_dir}")
            return None
    summary = write_outputs(results, args, toy, out_dir)
    print()
    print(format_table(summary))
    if toy:
        print(
            f"\nbest possible -ELBO = log({args.n_sequences}) = {summary['optimum_elbo']:.3f} nats"
        )
        print(ordering_sentence(summary))
    print(f"\nwrote {out_dir}/summary.md, summary.json, curves.json and the PNG figures")
    return summary


if __name__ == "__main__":  # pragma: no cover
    main()
