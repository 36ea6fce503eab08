"""User modules for the own-model export tests: what a user would bring (imported by path, e.g.
`python -m export --module tests.own_modules:gru_classifier`)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

FEATURES = 6


class Tagger(nn.Module):
    """projection -> recurrent layer -> per-step tags and a pooled classification (two outputs)."""

    def __init__(self, cell: type[nn.RNNBase] = nn.GRU, classes: int = 3, **layer) -> None:
        super().__init__()
        self.proj = nn.Linear(FEATURES, 10)
        self.rnn = cell(10, 8, num_layers=2, bidirectional=True, batch_first=True, **layer)
        self.tags = nn.Linear(16, 4)
        self.head = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        packed = pack_padded_sequence(torch.tanh(self.proj(x)), lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        y, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])  # (B, T, 16)
        pooled = y.sum(dim=1) / lengths.unsqueeze(1).to(y.dtype)  # (B, 16)
        return self.head(pooled), self.tags(y)  # (B, C), (B, T, 4)


class LastState(nn.Module):
    """A time-major RNN whose single output is the last layer's final state (time-major input)."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.RNN(FEATURES, 5, num_layers=1, nonlinearity="relu")

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = pack_padded_sequence(x.transpose(0, 1), lengths, enforce_sorted=False)  # (T, B, F)
        _, h = self.rnn(packed)
        return h[-1]  # (B, 5)


class Unpacked(nn.Module):
    """A mistake users make: the LSTM reads the padding (no pack_padded_sequence)."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(FEATURES, 4, batch_first=True)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        y, _ = self.rnn(x)
        return y


class NoTotalLength(nn.Module):
    """Another: pad_packed_sequence without total_length (eager output is only max(lengths) long)."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(FEATURES, 4, batch_first=True)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
        y, _ = pad_packed_sequence(out, batch_first=True)
        return y


class WrongSignature(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(FEATURES, 4, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rnn(x)[0]


class Projected(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(FEATURES, 8, proj_size=4, batch_first=True)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
        return pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])[0]


def gru_classifier() -> Tagger:
    torch.manual_seed(5)
    return Tagger(nn.GRU)


def lstm_tagger() -> Tagger:
    torch.manual_seed(6)
    return Tagger(nn.LSTM, bias=False)


def relu_last_state() -> LastState:
    torch.manual_seed(7)
    return LastState()


def unpacked() -> Unpacked:
    return Unpacked()


def no_total_length() -> NoTotalLength:
    return NoTotalLength()


def wrong_signature() -> WrongSignature:
    return WrongSignature()


def projected() -> Projected:
    return Projected()


def not_a_module() -> str:
    return "a string"
