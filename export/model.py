"""Reference PyTorch recurrent encoders (packed-sequence semantics) and their statically unrolled twins.

`RecurrentEncoder` (an `nn.LSTM`, `nn.GRU` or `nn.RNN` over padded batches with per-sequence
lengths) is the source of truth: everything exported or served is checked against it.
`StaticUnrolledRNN` runs the same parameters as one explicit cell per time step (TensorFlow's
`static_rnn`), masking by `lengths` so that a short sequence padded to T gives the same result.
`LSTMConfig`/`LSTMEncoder`/`StaticUnrolledLSTM` are the same classes under their first names.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from export.config import GATES, NONLINEARITIES, LSTMConfig, RecurrentConfig  # noqa: F401 - re-exported

# cell -> (PyTorch module, gates per hidden unit)
CELLS: dict[str, tuple[type[nn.RNNBase], int]] = {"lstm": (nn.LSTM, 4), "gru": (nn.GRU, 3), "rnn": (nn.RNN, 1)}


class RecurrentEncoder(nn.Module):
    """`nn.LSTM`/`nn.GRU`/`nn.RNN` over padded batches with per-sequence lengths.

    forward(x (B, T, F) float32, lengths (B,) int64) ->
        y (B, T, D*H): zero past each length,
        h_n (and c_n for LSTM) (L*D, B, H): state at each sequence's last valid step
    Lengths may come in any order; each must be in 1..T. The layer is the attribute `lstm`,
    `gru` or `rnn` (so an LSTM's parameters are named `lstm.weight_ih_l0`, ...).
    """

    def __init__(self, config: RecurrentConfig) -> None:
        super().__init__()
        self.config = config
        self.layer_name = config.cell
        self.add_module(config.cell, config.make_layer())

    @property
    def layer(self) -> nn.RNNBase:
        return getattr(self, self.layer_name)

    def forward(
        self,
        x: torch.Tensor,
        lengths: torch.Tensor,
        h0: torch.Tensor | None = None,
        c0: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """Optional initial states h0 (and c0 for LSTM) (L*D, B, H), in the batch's own order (zeros if None)."""
        return self.run(x, lengths, lengths_sorted=False, h0=h0, c0=c0)

    def run(
        self,
        x: torch.Tensor,
        lengths: torch.Tensor,
        lengths_sorted: bool,
        h0: torch.Tensor | None = None,
        c0: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """`lengths_sorted=True` skips the sort/unsort; only the ONNX export uses it (see below)."""
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=lengths_sorted)
        # the layer permutes hx by the packed sequence's sort order itself
        if self.config.cell == "lstm":
            hx = None if h0 is None else (h0, c0 if c0 is not None else torch.zeros_like(h0))
        else:
            hx = h0
        out, state = self.layer(packed, hx)
        y, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])  # (B, T, D*H)
        if self.config.cell == "lstm":
            return y, state[0], state[1]
        return y, state


LSTMEncoder = RecurrentEncoder


class ExportView(nn.Module):
    """The encoder as the dynamic export traces it.

    ONNX's recurrent ops take `sequence_lens` in any order, so the exported graph needs no
    sort/unsort and feeds `lengths` straight into every LSTM/GRU/RNN node. Eager PyTorch needs the
    sort, which `RecurrentEncoder.forward` keeps. A separate view (not a global "exporting" flag)
    keeps the reference model's behaviour independent of exports running in other threads.
    """

    def __init__(self, encoder: RecurrentEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.encoder.run(x, lengths, lengths_sorted=True)


class StatefulExportView(nn.Module):
    """ExportView with initial-state inputs h0 (and c0 for LSTM) (L*D, B, H), fed to every layer's node."""

    def __init__(self, encoder: RecurrentEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor, lengths: torch.Tensor, *states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.encoder.run(
            x, lengths, lengths_sorted=True, h0=states[0], c0=states[1] if len(states) > 1 else None
        )


class StaticUnrolledRNN(nn.Module):
    """The same weights as a `RecurrentEncoder`, unrolled over a fixed number of steps.

    One cell per step per layer per direction, like TensorFlow's `static_rnn`. The state of a
    sequence is frozen once its length is reached (forward), and the backward direction stays at
    zero until it reaches the sequence's last valid step, so results equal the dynamic model.
    """

    def __init__(self, encoder: RecurrentEncoder, steps: int) -> None:
        super().__init__()
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"static length T must be an integer >= 1, got {steps!r}")
        self.config = encoder.config
        self.steps = steps
        self.add_module(encoder.layer_name, encoder.layer)  # shared parameters, not a copy
        self.layer_name = encoder.layer_name

    def _weights(self, layer: int, reverse: bool) -> tuple[torch.Tensor, ...]:
        rnn = getattr(self, self.layer_name)
        sfx = f"_l{layer}" + ("_reverse" if reverse else "")
        w_ih = getattr(rnn, "weight_ih" + sfx)  # (G*H, in)
        w_hh = getattr(rnn, "weight_hh" + sfx)  # (G*H, H)
        if self.config.bias:
            b_ih, b_hh = getattr(rnn, "bias_ih" + sfx), getattr(rnn, "bias_hh" + sfx)  # (G*H,)
        else:
            b_ih = b_hh = w_ih.new_zeros(w_ih.shape[0])
        return w_ih.t(), w_hh.t(), b_ih, b_hh

    def _cell(self, x_t, h, c, weights):
        """One step: PyTorch's equations for the cell (gate order i,f,g,o for LSTM; r,z,n for GRU)."""
        w_ih, w_hh, b_ih, b_hh = weights
        cell = self.config.cell
        if cell == "lstm":
            i, f, g, o = (x_t @ w_ih + h @ w_hh + b_ih + b_hh).chunk(4, dim=1)  # (B, H) each
            c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            return torch.sigmoid(o) * torch.tanh(c_new), c_new
        if cell == "gru":
            ir, iz, inn = (x_t @ w_ih + b_ih).chunk(3, dim=1)
            hr, hz, hn = (h @ w_hh + b_hh).chunk(3, dim=1)
            r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
            n = torch.tanh(inn + r * hn)  # PyTorch applies r after the hidden matmul (ONNX linear_before_reset=1)
            return (1 - z) * n + z * h, c
        pre = x_t @ w_ih + b_ih + h @ w_hh + b_hh
        return (torch.relu(pre) if self.config.nonlinearity == "relu" else torch.tanh(pre)), c

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, ...]:
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
                weights = self._weights(layer, reverse)
                h = x.new_zeros(batch, hidden)  # (B, H)
                c = x.new_zeros(batch, hidden)
                outs: list[torch.Tensor] = [h] * steps
                order = range(steps - 1, -1, -1) if reverse else range(steps)
                for t in order:
                    h_new, c_new = self._cell(layer_in[t], h, c, weights)
                    h = torch.where(valid[t], h_new, h)
                    c = torch.where(valid[t], c_new, c)
                    outs[t] = torch.where(valid[t], h_new, torch.zeros_like(h_new))
                h_all.append(h)
                c_all.append(c)
                dir_outs.append(outs)
            layer_in = [torch.cat([d[t] for d in dir_outs], dim=1) for t in range(steps)]
        y = torch.stack(layer_in, dim=1)  # (B, T, D*H)
        if cfg.cell == "lstm":
            return y, torch.stack(h_all, dim=0), torch.stack(c_all, dim=0)  # (L*D, B, H)
        return y, torch.stack(h_all, dim=0)


StaticUnrolledLSTM = StaticUnrolledRNN
