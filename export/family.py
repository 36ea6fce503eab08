"""The default model family that `make export` writes, and where each file goes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from export.config import LSTMConfig, RecurrentConfig

# T = 100 and 200 show the super-linear load time but take minutes: `--report-lengths 10,25,50,100,200`
REPORT_STATIC_LENGTHS = (10, 25, 50)
SERVED_STATIC_LENGTH = 50  # the static model that the server loads by default


@dataclass(frozen=True)
class FamilyMember:
    name: str
    config: LSTMConfig
    seed: int
    static_lengths: tuple[int, ...] = ()  # static variants served beside the dynamic model
    note: str = ""
    initial_state: bool = False  # h0/c0 inputs: the server can keep state between chunks
    twins: tuple[str, ...] = ()  # precision twins written beside it (export.precision): int8, fp16


FAMILY = (
    FamilyMember(
        "encoder",
        LSTMConfig(input_size=80, hidden_size=256, num_layers=2, bidirectional=True),
        seed=0,
        static_lengths=(SERVED_STATIC_LENGTH,),
        note="bidirectional 2-layer encoder sized like a speech encoder (80 log-mel bins)",
        twins=("int8", "fp16"),
    ),
    FamilyMember(
        "stream_encoder",
        LSTMConfig(input_size=80, hidden_size=256, num_layers=2, bidirectional=False),
        seed=0,
        note="unidirectional 2-layer encoder with h0/c0 inputs: long streams sent in chunks",
        initial_state=True,
    ),
    FamilyMember(
        "tf_example",
        LSTMConfig(input_size=5, hidden_size=3, num_layers=1, bidirectional=False),
        seed=0,
        note="TensorFlow dynamic_rnn documentation shape: 5 features, 3 units, 1 layer",
    ),
    FamilyMember(
        "gru_encoder",
        RecurrentConfig(input_size=80, hidden_size=256, num_layers=2, bidirectional=True, cell="gru"),
        seed=0,
        note="the encoder's shape as a GRU: native ONNX GRU nodes (linear_before_reset=1, PyTorch's GRU)",
    ),
    FamilyMember(
        "rnn_stream",
        RecurrentConfig(
            input_size=40, hidden_size=64, num_layers=2, bidirectional=False, cell="rnn", nonlinearity="relu"
        ),  # fmt: skip
        seed=0,
        note="a vanilla (Elman) RNN with ReLU and an h0 input: one state to carry between chunks",
        initial_state=True,
    ),
)


# The report's small model (not served): hidden size 32, so that its unrolled graph, not its
# weights, fills a static file; its precision twins are measured beside the encoder's.
REPORT_SMALL = FamilyMember(
    "small",
    LSTMConfig(input_size=40, hidden_size=32, num_layers=2, bidirectional=True),
    seed=0,
    note="report only: a small bidirectional LSTM, 40 inputs, 32 units",
)
PRECISION_REPORT_T = 50  # the precision table's latency T and its static fp32 row


def build(member: FamilyMember):
    """Seeded random weights: the same member always gets the same weights hash."""
    import torch

    from export.model import LSTMEncoder

    torch.manual_seed(member.seed)
    return LSTMEncoder(member.config).eval()


def model_path(root: Path, name: str, version: int = 1) -> Path:
    """Triton-style repository layout: <root>/<model>/<version>/model.onnx."""
    return root / name / str(version) / "model.onnx"


def static_name(name: str, steps: int) -> str:
    return f"{name}_static_t{steps}"
