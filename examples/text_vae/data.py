"""The data of the text-VAE example: a vocabulary, the toy set, a corpus reader, batches."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
IGNORE_INDEX = -100
SCHEDULE_NAMES = ("constant", "monotonic", "cyclical")
# Selectable with --schedules, not trained by default: "controller" is
# ControlVAE's feedback beta (klanneal.schedules.KLController, --target-kl).
EXTRA_SCHEDULES = ("controller",)

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
        try:
            for line in f:
                tokens = line.split()
                if not tokens or (drop_longer is not None and len(tokens) > drop_longer):
                    continue
                sentences.append(tokens[:max_len] if max_len else tokens)
                if max_sentences is not None and len(sentences) >= max_sentences:
                    break
        except UnicodeDecodeError as err:
            bad = err.object[err.start : err.start + 1].hex()
            raise ValueError(
                f"{path}: not UTF-8 text (a byte 0x{bad}); re-encode the file as UTF-8"
            ) from None
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
