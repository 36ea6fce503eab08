"""Token-id user modules for the export tests: nn.Embedding first, as taggers, classifiers and
language models are built (imported by path: `python -m export --module tests.token_modules:bilstm_tagger`)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

TAGGER_VOCAB, CLASSIFIER_VOCAB = 50, 30


class EmbeddingTagger(nn.Module):
    """Embedding -> 2-layer bidirectional LSTM -> Linear: per-token logits."""

    def __init__(self, vocab: int = TAGGER_VOCAB, tags: int = 5) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 12, padding_idx=0)
        self.rnn = nn.LSTM(12, 8, num_layers=2, bidirectional=True, batch_first=True)
        self.out = nn.Linear(16, tags)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        e = self.embed(tokens)  # (B, T, 12)
        packed = pack_padded_sequence(e, lengths.cpu(), batch_first=True, enforce_sorted=False)
        y, _ = pad_packed_sequence(self.rnn(packed)[0], batch_first=True, total_length=tokens.shape[1])  # (B, T, 16)
        return self.out(y)  # (B, T, tags)


class EmbeddingClassifier(nn.Module):
    """Embedding -> GRU -> Linear on the final state: one label per sequence (time-major inside)."""

    def __init__(self, vocab: int = CLASSIFIER_VOCAB, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 10)
        self.rnn = nn.GRU(10, 7)
        self.head = nn.Linear(7, classes)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        e = self.embed(tokens.transpose(0, 1))  # (T, B, 10)
        _, h = self.rnn(pack_padded_sequence(e, lengths, enforce_sorted=False))  # (1, B, 7)
        return self.head(h[-1])  # (B, classes)


class FeaturesWithPositions(nn.Module):
    """A features model that also holds an nn.Embedding, applied after its first layer (positions):
    its input is not token ids."""

    def __init__(self, features: int = 6) -> None:
        super().__init__()
        self.proj = nn.Linear(features, 8)
        self.positions = nn.Embedding(64, 8)
        self.rnn = nn.GRU(8, 4, batch_first=True)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        steps = torch.arange(x.shape[1], device=x.device)
        h = self.proj(x) + self.positions(steps)  # (B, T, 8)
        out, _ = self.rnn(pack_padded_sequence(h, lengths, batch_first=True, enforce_sorted=False))
        return pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])[0]  # (B, T, 4)


class Unpacked(EmbeddingTagger):
    """A mistake: the LSTM reads the padded embeddings (no pack_padded_sequence)."""

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.out(self.rnn(self.embed(tokens))[0])  # (B, T, tags)


def bilstm_tagger() -> EmbeddingTagger:
    torch.manual_seed(11)
    return EmbeddingTagger()


def gru_classifier() -> EmbeddingClassifier:
    torch.manual_seed(12)
    return EmbeddingClassifier()


def features_with_positions() -> FeaturesWithPositions:
    torch.manual_seed(13)
    return FeaturesWithPositions()


def unpacked() -> Unpacked:
    torch.manual_seed(14)
    return Unpacked()


def max_norm_tagger() -> EmbeddingTagger:
    torch.manual_seed(15)
    model = EmbeddingTagger()
    model.embed.max_norm = 1.0
    return model
