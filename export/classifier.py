"""A sequence classifier on the project's LSTM encoder: normalise -> LSTM -> mean over valid steps -> linear.

Same packed-sequence semantics as the encoder: padding never changes a result, because the
mean is taken over each sequence's own valid steps (y is zero past its length). Input
normalisation (per-feature mean/std of the training set) is part of the model and of the
exported graph, so clients send raw coefficients.
"""

from __future__ import annotations

import torch
from torch import nn

from export.model import LSTMConfig, LSTMEncoder, StaticUnrolledLSTM


class SequenceClassifier(nn.Module):
    """forward(x (B, T, F), lengths (B,)) -> logits (B, C), probs (B, C)."""

    def __init__(self, config: LSTMConfig, num_classes: int) -> None:
        super().__init__()
        self.config = config
        self.num_classes = num_classes
        self.register_buffer("mean", torch.zeros(config.input_size))  # (F,)
        self.register_buffer("std", torch.ones(config.input_size))  # (F,)
        self.encoder = LSTMEncoder(config)
        self.head = nn.Linear(config.hidden_size * config.num_directions, num_classes)

    def head_from_states(self, y: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = y.sum(dim=1) / lengths.to(y.dtype).unsqueeze(1)  # (B, D*H): mean over valid steps
        logits = self.head(pooled)  # (B, C)
        return logits, torch.softmax(logits, dim=1)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def run(self, x: torch.Tensor, lengths: torch.Tensor, lengths_sorted: bool):
        y, _, _ = self.encoder.run(self.normalise(x), lengths, lengths_sorted)  # (B, T, D*H)
        return self.head_from_states(y, lengths)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.run(x, lengths, lengths_sorted=False)


class ClassifierExportView(nn.Module):
    """Dynamic export: no sort/unsort around the LSTM (see export.model.ExportView)."""

    def __init__(self, classifier: SequenceClassifier) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, x: torch.Tensor, lengths: torch.Tensor):
        return self.classifier.run(x, lengths, lengths_sorted=True)


class StaticClassifier(nn.Module):
    """The same classifier, its LSTM unrolled over a fixed T (padding still honours lengths)."""

    def __init__(self, classifier: SequenceClassifier, steps: int) -> None:
        super().__init__()
        self.classifier = classifier
        self.lstm = StaticUnrolledLSTM(classifier.encoder, steps)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor):
        y, _, _ = self.lstm(self.classifier.normalise(x), lengths)  # (B, T, D*H)
        return self.classifier.head_from_states(y, lengths)
