"""Reference PyTorch LSTM encoder (packed-sequence semantics) and its statically unrolled twin.

`LSTMEncoder` is the source of truth: everything exported or served is checked against it.
`StaticUnrolledLSTM` runs the same parameters as one explicit cell per time step (TensorFlow's
`static_rnn`), masking by `lengths` so that a short sequence padded to T gives the same result.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


@dataclass(frozen=True)
class LSTMConfig:
    """Shape of an LSTM encoder. Axes everywhere: (batch, time, features)."""

    input_size: int = 80  # features per time step (e.g. 80 log-mel bins)
    hidden_size: int = 256  # units per direction
    num_layers: int = 2  # stacked LSTM layers
    bidirectional: bool = True  # add a backward direction that starts at each sequence's end

    def __post_init__(self) -> None:
        for name in ("input_size", "hidden_size", "num_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.bidirectional, bool):
            raise ValueError(f"bidirectional must be true or false, got {self.bidirectional!r}")

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LSTMConfig:
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown LSTM config option(s): {', '.join(unknown)}")
        return cls(**data)

    def param_count(self) -> int:
        """Parameters of torch.nn.LSTM with this shape (PyTorch keeps two bias vectors)."""
        total = 0
        for layer in range(self.num_layers):
            in_size = self.input_size if layer == 0 else self.hidden_size * self.num_directions
            per_dir = 4 * self.hidden_size * (in_size + self.hidden_size) + 2 * 4 * self.hidden_size
            total += per_dir * self.num_directions
        return total


class LSTMEncoder(nn.Module):
    """`nn.LSTM` over padded batches with per-sequence lengths.

    forward(x (B, T, F) float32, lengths (B,) int64) ->
        y (B, T, D*H): zero past each length,
        h_n, c_n (L*D, B, H): state at each sequence's last valid step
    Lengths may come in any order; each must be in 1..T.
    """

    def __init__(self, config: LSTMConfig) -> None:
        super().__init__()
        self.config = config
        self.lstm = nn.LSTM(
            input_size=config.input_size,
            hidden_size=config.hidden_size,
            num_layers=config.num_layers,
            bidirectional=config.bidirectional,
            batch_first=True,
        )

    def forward(
        self,
        x: torch.Tensor,
        lengths: torch.Tensor,
        h0: torch.Tensor | None = None,
        c0: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Optional initial states h0, c0 (L*D, B, H), in the batch's own order (zeros if None)."""
        return self.run(x, lengths, lengths_sorted=False, h0=h0, c0=c0)

    def run(
        self,
        x: torch.Tensor,
        lengths: torch.Tensor,
        lengths_sorted: bool,
        h0: torch.Tensor | None = None,
        c0: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`lengths_sorted=True` skips the sort/unsort; only the ONNX export uses it (see below)."""
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=lengths_sorted)
        # nn.LSTM permutes hx by the packed sequence's sort order itself
        hx = None if h0 is None else (h0, c0 if c0 is not None else torch.zeros_like(h0))
        out, (h_n, c_n) = self.lstm(packed, hx)
        y, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])  # (B, T, D*H)
        return y, h_n, c_n


class ExportView(nn.Module):
    """The encoder as the dynamic export traces it.

    ONNX's LSTM takes `sequence_lens` in any order, so the exported graph needs no sort/unsort
    and feeds `lengths` straight into every LSTM node. Eager PyTorch needs the sort, which
    `LSTMEncoder.forward` keeps. A separate view (not a global "exporting" flag) keeps the
    reference model's behaviour independent of exports running in other threads.
    """

    def __init__(self, encoder: LSTMEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.encoder.run(x, lengths, lengths_sorted=True)


class StatefulExportView(nn.Module):
    """ExportView with initial-state inputs h0, c0 (L*D, B, H), fed to every layer's LSTM node."""

    def __init__(self, encoder: LSTMEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(
        self, x: torch.Tensor, lengths: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.encoder.run(x, lengths, lengths_sorted=True, h0=h0, c0=c0)


class StaticUnrolledLSTM(nn.Module):
    """The same weights as an `LSTMEncoder`, unrolled over a fixed number of steps.

    One cell per step per layer per direction, like TensorFlow's `static_rnn`. The state of a
    sequence is frozen once its length is reached (forward), and the backward direction stays at
    zero until it reaches the sequence's last valid step, so results equal the dynamic model.
    """

    def __init__(self, encoder: LSTMEncoder, steps: int) -> None:
        super().__init__()
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"static length T must be an integer >= 1, got {steps!r}")
        self.config = encoder.config
        self.steps = steps
        self.lstm = encoder.lstm  # shared parameters, not a copy

    def _weights(self, layer: int, reverse: bool) -> tuple[torch.Tensor, ...]:
        sfx = f"_l{layer}" + ("_reverse" if reverse else "")
        w_ih = getattr(self.lstm, "weight_ih" + sfx)  # (4H, in)
        w_hh = getattr(self.lstm, "weight_hh" + sfx)  # (4H, H)
        bias = getattr(self.lstm, "bias_ih" + sfx) + getattr(self.lstm, "bias_hh" + sfx)  # (4H,)
        return w_ih.t(), w_hh.t(), bias

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg = self.config
        batch = x.shape[0]
        hidden = cfg.hidden_size
        steps = self.steps
        # valid[t]: (B, 1) True where step t is inside the sequence
        valid = [(lengths > t).unsqueeze(1) for t in range(steps)]
        layer_in = [x[:, t, :] for t in range(steps)]  # T x (B, F)
        h_all: list[torch.Tensor] = []
        c_all: list[torch.Tensor] = []
        for layer in range(cfg.num_layers):
            dir_outs: list[list[torch.Tensor]] = []
            for reverse in [False, True][: cfg.num_directions]:
                w_ih, w_hh, bias = self._weights(layer, reverse)
                h = x.new_zeros(batch, hidden)  # (B, H)
                c = x.new_zeros(batch, hidden)
                outs: list[torch.Tensor] = [h] * steps
                order = range(steps - 1, -1, -1) if reverse else range(steps)
                for t in order:
                    gates = layer_in[t] @ w_ih + h @ w_hh + bias  # (B, 4H)
                    i, f, g, o = gates.chunk(4, dim=1)
                    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                    h_new = torch.sigmoid(o) * torch.tanh(c_new)
                    h = torch.where(valid[t], h_new, h)
                    c = torch.where(valid[t], c_new, c)
                    outs[t] = torch.where(valid[t], h_new, torch.zeros_like(h_new))
                h_all.append(h)
                c_all.append(c)
                dir_outs.append(outs)
            layer_in = [torch.cat([d[t] for d in dir_outs], dim=1) for t in range(steps)]
        y = torch.stack(layer_in, dim=1)  # (B, T, D*H)
        return y, torch.stack(h_all, dim=0), torch.stack(c_all, dim=0)  # (L*D, B, H)
