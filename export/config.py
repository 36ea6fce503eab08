"""The shape of a recurrent layer, without torch: what export metadata, the CLI and the family
describe (`export.model` builds the PyTorch modules from it)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

GATES = {"lstm": 4, "gru": 3, "rnn": 1}  # gates per hidden unit: PyTorch's weight rows are GATES * hidden
NONLINEARITIES = ("tanh", "relu")  # nn.RNN only


@dataclass(frozen=True)
class RecurrentConfig:
    """Shape of a recurrent encoder. Axes everywhere: (batch, time, features)."""

    input_size: int = 80  # features per time step (e.g. 80 log-mel bins)
    hidden_size: int = 256  # units per direction
    num_layers: int = 2  # stacked layers
    bidirectional: bool = True  # add a backward direction that starts at each sequence's end
    cell: str = "lstm"  # lstm | gru | rnn (PyTorch's nn.LSTM, nn.GRU, nn.RNN)
    bias: bool = True  # PyTorch's `bias`: bias_ih/bias_hh vectors present
    nonlinearity: str = "tanh"  # nn.RNN's activation (tanh | relu); ignored by LSTM and GRU

    def __post_init__(self) -> None:
        for name in ("input_size", "hidden_size", "num_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("bidirectional", "bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.cell not in GATES:
            raise ValueError(f"cell must be one of {', '.join(GATES)}, got {self.cell!r}")
        if self.nonlinearity not in NONLINEARITIES:
            raise ValueError(f"nonlinearity must be tanh or relu, got {self.nonlinearity!r}")

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def gates(self) -> int:
        return GATES[self.cell]

    @property
    def state_names(self) -> list[str]:
        """Initial-state inputs of a stateful export: LSTM has two states, GRU and RNN one."""
        return ["h0", "c0"] if self.cell == "lstm" else ["h0"]

    @property
    def output_names(self) -> list[str]:
        return ["y", "h_n", "c_n"] if self.cell == "lstm" else ["y", "h_n"]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RecurrentConfig:
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown recurrent config option(s): {', '.join(unknown)}")
        return cls(**data)

    def param_count(self) -> int:
        """Parameters of the PyTorch layer with this shape (PyTorch keeps two bias vectors)."""
        total = 0
        g, h = self.gates, self.hidden_size
        for layer in range(self.num_layers):
            in_size = self.input_size if layer == 0 else h * self.num_directions
            per_dir = g * h * (in_size + h) + (2 * g * h if self.bias else 0)
            total += per_dir * self.num_directions
        return total

    def make_layer(self):
        """The PyTorch module of this shape (nn.LSTM/GRU/RNN), batch_first (our axes: batch, time, features)."""
        from torch import nn

        layer = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[self.cell]
        kwargs = dict(
            input_size=self.input_size,
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            bidirectional=self.bidirectional,
            bias=self.bias,
            batch_first=True,
        )
        if self.cell == "rnn":
            kwargs["nonlinearity"] = self.nonlinearity
        return layer(**kwargs)


LSTMConfig = RecurrentConfig
