"""Export other people's models: a checkpoint of a bare nn.LSTM/nn.GRU/nn.RNN, a state dict with one
such layer under a prefix, or the user's own module around one.

Every export goes through the same gate as the built-in family (`export.verify`): the graph must
loop natively (ONNX LSTM/GRU/RNN nodes fed by `sequence_lens`) and agree with eager PyTorch on
seeded ragged batches before its file is written. Errors are `ExportError`s: one line naming the
problem and what was expected; the CLI turns them into exit code 2 and leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import math
import pickle
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from contract import metadata as keys
from export.model import CELLS, RecurrentConfig, RecurrentEncoder, StaticUnrolledRNN
from export.onnx_export import (
    BATCH,
    INPUT_NAMES,
    TIME,
    ExportResult,
    check_static_length,
    export_dynamic,
    export_static,
    write_model,
)
from export.verify import ExportError, check_parity

_KEY = re.compile(
    r"^(?P<prefix>.*?)(?P<kind>weight_ih|weight_hh|bias_ih|bias_hh|weight_hr)_l(?P<layer>\d+)(?P<rev>_reverse)?$"
)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # torch.load's messages carry terminal bold
_NESTED = ("state_dict", "model_state_dict", "model")  # where trainers (Lightning, scripts) nest the weights
# What x can be: features (batch, time, features) float32, or token ids (batch, time) int64 that the
# module's first layer, an nn.Embedding, looks up.
INPUT_DTYPES = ("float32", "int64")


# -- checkpoints ---------------------------------------------------------------------------------
def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from `torch.save(module.state_dict())` (or a dict nesting one under
    'state_dict'/'model_state_dict'/'model'). Loaded with weights_only=True: no code runs."""
    if not path.is_file():
        raise ExportError(f"--weights {path}: no such file")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says it all
            warnings.simplefilter("ignore")
            data = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refuses every pickled global but tensors and plain containers before it is
        # built: a whole pickled module, a custom class, or a function a crafted file would call.
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found:
            raise ExportError(
                f"--weights {path}: holds a pickled Python object ({found.group(1)}), not only tensors; refused "
                "without loading it (unpickling could run code). Expected torch.save(layer.state_dict())"
            ) from None
        operand = re.search(r"Unsupported operand \d+", str(exc))
        detail = f"UnpicklingError: {operand.group(0)}" if operand else _detail(exc)
        raise ExportError(
            f"--weights {path}: not a PyTorch checkpoint of tensors (torch.load failed: {detail}); "
            "expected the file torch.save(layer.state_dict()) writes"
        ) from None
    except Exception as exc:  # noqa: BLE001 - any failure means "not a checkpoint we can read"
        raise ExportError(
            f"--weights {path}: not a PyTorch checkpoint of tensors (torch.load failed: {_detail(exc)}); "
            "expected the file torch.save(layer.state_dict()) writes"
        ) from None
    if isinstance(data, dict):
        for key in _NESTED:
            if isinstance(data.get(key), dict) and not any(isinstance(v, torch.Tensor) for v in data.values()):
                data = data[key]
                break
    if not isinstance(data, dict) or not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
        kind = type(data).__name__
        raise ExportError(
            f"--weights {path}: holds a {kind}, not a state dict of tensors; expected torch.save(layer.state_dict())"
        )
    return data


def _detail(exc: Exception) -> str:
    detail = " ".join(_ANSI.sub("", str(exc)).split())[:160]
    return f"{type(exc).__name__}: {detail}" if len(detail) > 12 else type(exc).__name__


def find_layers(state: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """{prefix: keys} of every recurrent layer in a state dict (prefix '' for a bare layer)."""
    layers: dict[str, list[str]] = {}
    for key in state:
        m = _KEY.match(key)
        if m:
            layers.setdefault(m.group("prefix"), []).append(key)
    return {p: keys for p, keys in layers.items() if any(k.endswith("weight_ih_l0") for k in keys)}


def _pick_prefix(state: dict[str, torch.Tensor], prefix: str | None) -> str:
    layers = find_layers(state)
    if prefix is not None:
        wanted = prefix if not prefix or prefix.endswith(".") else prefix + "."
        if wanted not in layers:
            found = ", ".join(repr(p.rstrip(".")) for p in layers) or "none"
            raise ExportError(f"--prefix {prefix!r}: no recurrent layer there; layers found under: {found}")
        return wanted
    if not layers:
        keys = list(state)
        shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} keys)" if len(keys) > 8 else "")
        raise ExportError(
            f"no nn.LSTM, nn.GRU or nn.RNN weights in the state dict (keys: {shown}); expected keys such as "
            "weight_ih_l0, weight_hh_l0 (optionally under a prefix like encoder.rnn.)"
        )
    if len(layers) > 1:
        names = ", ".join(repr(p.rstrip(".")) for p in sorted(layers))
        raise ExportError(f"{len(layers)} recurrent layers in the state dict ({names}): choose one with --prefix")
    return next(iter(layers))


def config_from_state_dict(
    state: dict[str, torch.Tensor], prefix: str | None = None, nonlinearity: str = "tanh", cell: str | None = None
) -> tuple[RecurrentConfig, dict[str, torch.Tensor]]:
    """Read the layer's config from its tensor names and shapes; return it with the layer's own
    state dict (keys without the prefix). `cell` forces lstm/gru/rnn (else read from the shapes)."""
    prefix = _pick_prefix(state, prefix)
    where = f"layer '{prefix.rstrip('.')}'" if prefix else "the layer"
    own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix) and _KEY.match(k[len(prefix) :])}
    if any(k.startswith("weight_hr_l") for k in own):
        raise ExportError(
            f"{where} is an LSTM with proj_size (weight_hr_l* present): LSTM with proj_size has no ONNX LSTM "
            "equivalent; export a model without projections"
        )
    w_ih, w_hh = own["weight_ih_l0"], own.get("weight_hh_l0")
    if w_hh is None or w_ih.dim() != 2 or w_hh.dim() != 2 or w_hh.shape[1] < 1:
        raise ExportError(f"{where}: weight_ih_l0/weight_hh_l0 must be 2-D matrices; got shapes that form no layer")
    hidden = int(w_hh.shape[1])
    gates, rem = divmod(int(w_hh.shape[0]), hidden)
    by_gates = {g: c for c, (_, g) in CELLS.items()}
    if rem or gates not in by_gates:
        raise ExportError(
            f"{where}: weight_hh_l0 has shape {list(w_hh.shape)}; "
            "expected (G*H, H) with G = 4 (LSTM), 3 (GRU) or 1 (RNN)"
        )
    detected = by_gates[gates]
    if cell is not None and cell != detected:
        raise ExportError(f"{where}: --cell {cell} given, but the weight shapes are those of {detected.upper()}")
    layers = 1 + max(int(_KEY.match(k).group("layer")) for k in own)
    config = RecurrentConfig(
        input_size=int(w_ih.shape[1]),
        hidden_size=hidden,
        num_layers=layers,
        bidirectional=any(k.endswith("_reverse") for k in own),
        cell=detected,
        bias="bias_ih_l0" in own,
        nonlinearity=nonlinearity,
    )
    expected = config.make_layer().state_dict()
    missing = sorted(set(expected) - set(own))
    extra = sorted(set(own) - set(expected))
    if missing or extra:
        raise ExportError(
            f"{where}: the tensors do not form a {detected.upper()} of {layers} layer(s)"
            f"{', bidirectional' if config.bidirectional else ''}: missing {missing[:4]}, unexpected {extra[:4]}"
        )
    for key, tensor in expected.items():
        if tuple(own[key].shape) != tuple(tensor.shape):
            raise ExportError(
                f"{where}: {key} has shape {list(own[key].shape)}; a {detected.upper()} with input_size "
                f"{config.input_size} and hidden_size {hidden} needs {list(tensor.shape)}"
            )
        if not own[key].is_floating_point():
            raise ExportError(f"{where}: {key} is {own[key].dtype}; expected floating-point weights")
        _check_finite(f"{where}: {key}", own[key])
    return config, own


def _check_finite(what: str, tensor: torch.Tensor) -> None:
    """Weights are served as float32: NaN or Inf there (a diverged run; float64 values beyond float32's
    range) would make every output NaN, which the parity check cannot tell from a correct export."""
    values = tensor.detach().float()
    bad = ~torch.isfinite(values)
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        raw = tensor.detach()[first].item()
        value = raw if not math.isfinite(raw) else f"{raw:g} (beyond float32)"
        raise ExportError(
            f"{what} holds {int(bad.sum())} non-finite value(s) as float32, first {list(first)} = {value}; "
            "expected finite weights (a diverged training run?)"
        )


def encoder_from_state_dict(
    state: dict[str, torch.Tensor], prefix: str | None = None, nonlinearity: str = "tanh", cell: str | None = None
) -> RecurrentEncoder:
    config, own = config_from_state_dict(state, prefix, nonlinearity, cell)
    encoder = RecurrentEncoder(config)
    encoder.layer.load_state_dict({k: v.float() for k, v in own.items()})
    return encoder.eval()


def export_state_dict(
    path_in: Path,
    out: Path,
    name: str,
    version: int = 1,
    static: tuple[int, ...] = (),
    initial_state: bool = False,
    prefix: str | None = None,
    nonlinearity: str = "tanh",
) -> list[ExportResult]:
    """`torch.save(layer.state_dict())` -> <out>/<name>/<version>/model.onnx (+ <name>_static_tN)."""
    encoder = encoder_from_state_dict(load_state_dict(path_in), prefix, nonlinearity)
    extra = {"export.source": f"state dict {path_in.name}" + (f", prefix {prefix}" if prefix else "")}
    results = [export_dynamic(encoder, model_file(out, name, version), extra, initial_state=initial_state)]
    for steps in static:
        results.append(export_static(encoder, steps, model_file(out, f"{name}_static_t{steps}", version), extra))
    return results


def model_file(out: Path, name: str, version: int) -> Path:
    return out / name / str(version) / "model.onnx"


# -- the user's own module -----------------------------------------------------------------------
def load_module(spec: str, weights: Path | None = None) -> nn.Module:
    """'package.module:factory' -> factory() (an nn.Module), weights loaded strictly if given."""
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise ExportError(
            f"--module {spec!r}: expected package.module:factory (a function or class returning an nn.Module)"
        )
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # like `python -m`: modules in the working directory import
    try:
        module = importlib.import_module(mod_name)
    except Exception as exc:  # noqa: BLE001 - ImportError, SyntaxError, errors raised at import
        raise ExportError(f"--module {spec!r}: cannot import {mod_name!r} ({type(exc).__name__}: {exc})") from None
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise ExportError(f"--module {spec!r}: {mod_name!r} has no callable {attr!r}")
    try:
        model = factory()
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"--module {spec!r}: {attr}() failed ({type(exc).__name__}: {exc})") from None
    if not isinstance(model, nn.Module):
        raise ExportError(f"--module {spec!r}: {attr}() returned a {type(model).__name__}, expected an nn.Module")
    if weights is not None:
        state = load_state_dict(weights)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            detail = " ".join(str(exc).split())
            raise ExportError(f"--weights {weights}: does not fit {attr}() ({detail[:300]})") from None
    return model.eval()


def _check_signature(module: nn.Module) -> None:
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    varargs = any(p.kind == p.VAR_POSITIONAL for p in params)
    required = [p for p in positional if p.default is p.empty]
    if (len(positional) < 2 and not varargs) or len(required) > 2:
        names = ", ".join(p.name for p in params) or "nothing"
        raise ExportError(
            f"{type(module).__name__}.forward takes ({names}); expected forward(x, lengths) with x (batch, time, "
            "features) float32 or (batch, time) int64 token ids, and lengths (batch,) int64"
        )


def _as_tuple(out: object, where: str) -> tuple[torch.Tensor, ...]:
    outs = out if isinstance(out, tuple | list) else (out,)
    bad = [type(o).__name__ for o in outs if not isinstance(o, torch.Tensor)]
    if bad or not outs:
        raise ExportError(f"{where} returned {type(out).__name__} {bad}; expected a tensor or a tuple of tensors")
    return tuple(outs)


def token_embedding(module: nn.Module) -> tuple[nn.Module | None, int | None]:
    """(the first module `module` applies to its input, the vocabulary size) when that module is an
    nn.Embedding: found by running it once on token ids (batch 2, time 3) below every embedding's
    num_embeddings. The vocabulary is the smallest num_embeddings of the embeddings that look up the
    ids themselves (every id below it is valid for each). (first, None): token ids are not its input."""
    embeddings = [m for m in module.modules() if isinstance(m, nn.Embedding)]
    if not embeddings:
        return None, None  # nothing would take ids: no probe run
    vocab = min(e.num_embeddings for e in embeddings)
    ids = torch.randint(0, vocab, (2, 3), generator=torch.Generator().manual_seed(0))  # (B, T)
    lengths = torch.full((2,), 3, dtype=torch.int64)
    calls: list[tuple[nn.Module, bool]] = []

    def seen(sub: nn.Module, args: tuple) -> None:
        if not any(True for _ in sub.children()):  # leaves: a container's call is not an application
            arg = args[0] if args else None
            # the ids as given or transposed (a time-major module), not something derived (lengths)
            direct = isinstance(arg, torch.Tensor) and not arg.is_floating_point() and arg.shape in ((2, 3), (3, 2))
            calls.append((sub, direct))

    hooks = [sub.register_forward_pre_hook(seen) for sub in module.modules() if sub is not module]
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module(ids, lengths)
    except Exception:  # noqa: BLE001 - a features model given ids fails; what ran before still tells
        pass
    finally:
        for hook in hooks:
            hook.remove()
    if not calls:
        return None, None
    first, direct = calls[0]
    if not isinstance(first, nn.Embedding) or not direct:
        return first, None
    vocab = min(int(sub.num_embeddings) for sub, d in calls if d and isinstance(sub, nn.Embedding))
    return first, vocab


def resolve_input_dtype(module: nn.Module, given: str | None = None) -> tuple[str, int | None]:
    """(dtype of x, vocabulary size for int64 ids): detected when `given` is None (int64 when the
    first module applied to the input is an nn.Embedding), else checked against the module."""
    if given is not None and given not in INPUT_DTYPES:
        raise ExportError(
            f"--input-dtype {given}: not supported; expected float32 (x: (batch, time, features)) or int64 "
            "(x: (batch, time) token ids for an nn.Embedding)"
        )
    name = type(module).__name__
    for key, sub in module.named_modules():
        if isinstance(sub, nn.Embedding) and sub.max_norm is not None:
            # max_norm rescales the looked-up rows of the weight in place on every call, which the
            # exported graph (a Gather of the weights as they were at export) cannot reproduce
            raise ExportError(
                f"{name}: {key or 'the module'} is nn.Embedding with max_norm={sub.max_norm:g}, which rescales its "
                "weights in place on each lookup; ONNX has no equivalent: apply it to every row once "
                "(torch.embedding_renorm_) and set max_norm=None"
            )
    first, vocab = token_embedding(module)
    if given == "int64" and vocab is None:
        applied = f"applies {type(first).__name__} to its input first" if first is not None else "has no nn.Embedding"
        raise ExportError(
            f"--input-dtype int64: {name} {applied}; token ids need an nn.Embedding as the first module "
            "applied to x (its num_embeddings bounds the ids)"
        )
    if given == "float32" and vocab is not None:
        raise ExportError(
            f"--input-dtype float32: {name} applies nn.Embedding({vocab}, ...) to its input first, so it takes "
            "int64 token ids; give --input-dtype int64 or leave it out"
        )
    return ("int64" if vocab is not None else "float32"), vocab


def _sample(batch: int, steps: int, feature_size: int | None, vocab_size: int | None, gen=None) -> torch.Tensor:
    if vocab_size is not None:
        return torch.randint(0, vocab_size, (batch, steps), generator=gen)  # (B, T) int64 ids
    return torch.randn(batch, steps, feature_size, generator=gen)  # (B, T, F)


def probe_axes(
    module: nn.Module, feature_size: int | None, names: list[str] | None = None, vocab_size: int | None = None
) -> tuple[list[str], dict]:
    """Run the module eagerly at two (batch, time) sizes; an output axis that follows the batch
    size is `batch`, one that follows the time size is `time`, one that stays put is fixed.
    `vocab_size`: x is token ids (batch, time) below it (`feature_size` unused)."""
    runs = []
    gen = torch.Generator().manual_seed(0)
    for batch, steps in ((3, 7), (5, 11)):
        x = _sample(batch, steps, feature_size, vocab_size, gen)
        lengths = torch.full((batch,), steps, dtype=torch.int64)
        try:
            with torch.no_grad():
                runs.append(_as_tuple(module(x, lengths), f"{type(module).__name__}.forward"))
        except ExportError:
            raise
        except Exception as exc:  # noqa: BLE001
            what = f"{vocab_size} token ids" if vocab_size is not None else f"{feature_size} features"
            raise ExportError(
                f"{type(module).__name__}.forward(x{list(x.shape)}, lengths) failed "
                f"({type(exc).__name__}: {str(exc)[:200]}); expected forward(x, lengths) with {what}"
            ) from None
    count = len(runs[0])
    if names is None:
        names = [f"output_{i}" for i in range(count)]
    if len(names) != count or len(set(names)) != count or set(names) & set(INPUT_NAMES):
        raise ExportError(
            f"--output-names {','.join(names)}: the module returns {count} output(s); "
            f"give {count} distinct names other than x, lengths"
        )
    axes: dict[str, dict[int, str]] = {"x": {0: BATCH, 1: TIME}, "lengths": {0: BATCH}}
    for name, a, b in zip(names, *runs):
        if a.dim() != b.dim() or a.dtype != b.dtype:
            raise ExportError(f"output '{name}': its rank or dtype changes with the input size")
        if a.dtype != torch.float32:
            raise ExportError(
                f"output '{name}' is {a.dtype}; the export's parity gate compares float32 outputs "
                "(return it as .float())"
            )
        dims = {}
        for axis, (da, db) in enumerate(zip(a.shape, b.shape)):
            if (da, db) == (3, 5):
                dims[axis] = BATCH
            elif (da, db) == (7, 11):
                dims[axis] = TIME
            elif da != db:
                raise ExportError(
                    f"output '{name}': axis {axis} has size {da} then {db}; expected batch, time or a fixed size"
                )
        if BATCH not in dims.values():
            raise ExportError(
                f"output '{name}' has no batch axis (shape {list(a.shape)} for batch 3); every output needs one"
            )
        axes[name] = dims
    return names, axes


class _Padded:
    """Stands in for a PackedSequence while a user module is unrolled: the padded batch itself."""

    def __init__(self, data: torch.Tensor, lengths: torch.Tensor) -> None:
        self.data, self.lengths = data, lengths  # (B, T, F), (B,)


@contextlib.contextmanager
def _unrolled(module: nn.Module, steps: int) -> Iterator[None]:
    """Run `module` with every recurrent layer unrolled over `steps` (one cell per step): in the
    namespaces of the user's own modules (those defining the classes of `module`, its submodules and
    their bases, never torch's), the names bound to pack_padded_sequence/pad_packed_sequence become pass-throughs
    of the padded batch while the block runs, and each layer runs `StaticUnrolledRNN` on it. torch
    itself is left alone: other code in the process keeps the real functions."""
    import torch.nn.utils.rnn as rnn_utils

    real_pack, real_pad = rnn_utils.pack_padded_sequence, rnn_utils.pad_packed_sequence

    def pack(input, lengths, batch_first=False, enforce_sorted=True):  # noqa: A002, ARG001 - torch's names
        data = input if batch_first else input.transpose(0, 1)
        return _Padded(data, torch.as_tensor(lengths, device=data.device).to(torch.int64))

    def pad(sequence, batch_first=False, padding_value=0.0, total_length=None):  # noqa: ARG001
        if not isinstance(sequence, _Padded):
            return real_pad(sequence, batch_first, padding_value, total_length)
        data = sequence.data if total_length is None or total_length == steps else sequence.data[:, :total_length]
        return (data if batch_first else data.transpose(0, 1)), sequence.lengths

    patched: list[tuple[dict, str, object]] = []
    namespaces = {}
    for cls in {c for sub in module.modules() for c in type(sub).__mro__}:  # a forward may live in a base class
        mod = sys.modules.get(cls.__module__)
        if mod is not None and cls.__module__.split(".")[0] not in ("torch", "builtins"):
            namespaces[id(vars(mod))] = vars(mod)
    for ns in namespaces.values():
        for key, value in list(ns.items()):
            if value is real_pack:
                patched.append((ns, key, value))
                ns[key] = pack
            elif value is real_pad:
                patched.append((ns, key, value))
                ns[key] = pad
    layers = [m for m in module.modules() if isinstance(m, nn.RNNBase)]
    for layer in layers:
        layer.forward = _unrolled_forward(layer, steps)  # instance attribute: nn.Module.__call__ uses it
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # lengths become a tensor
            yield
    finally:
        for ns, key, value in reversed(patched):
            ns[key] = value
        for layer in layers:
            del layer.forward


class _PaddedOutputsView(nn.Module):
    """The user's module with every recurrent layer's packed output also unpacked and returned."""

    def __init__(self, module: nn.Module, layers: list[nn.RNNBase]) -> None:
        super().__init__()
        self.inner, self.layers = module, layers

    def _run(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], list[torch.Tensor]]:
        from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

        padded: list[torch.Tensor] = []

        def wrap(layer):
            def forward(inp, hx=None):
                out, state = type(layer).forward(layer, inp, hx)
                if isinstance(out, PackedSequence):
                    padded.append(pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])[0])
                return out, state

            return forward

        for layer in self.layers:
            layer.forward = wrap(layer)
        try:
            out = _as_tuple(self.inner(x, lengths), "forward")
        finally:
            for layer in self.layers:
                del layer.forward
        return out, padded

    def count(self, x: torch.Tensor, lengths: torch.Tensor) -> int:
        with torch.no_grad():
            return len(self._run(x, lengths)[1])

    def forward(self, x: torch.Tensor, lengths: torch.Tensor):
        out, padded = self._run(x, lengths)
        return (*out, *padded)


class _UnrolledView(nn.Module):
    """The user's module, unrolled only while its forward runs (so the eager reference is untouched)."""

    def __init__(self, module: nn.Module, steps: int) -> None:
        super().__init__()
        self.inner, self.steps = module, steps

    def forward(self, x: torch.Tensor, lengths: torch.Tensor):
        with _unrolled(self.inner, self.steps):
            return self.inner(x, lengths)


def _unrolled_forward(layer: nn.RNNBase, steps: int):
    config = layer_config(layer)
    encoder = RecurrentEncoder(config)
    encoder._modules[config.cell] = layer  # the user's own parameters
    static = StaticUnrolledRNN(encoder, steps)

    def forward(inp, hx=None):
        if not isinstance(inp, _Padded) or hx is not None:
            raise ExportError(
                f"--static: the {config.cell.upper()} layer must be called as layer(pack_padded_sequence(...)), "
                "with pack_padded_sequence imported by name into the module's file (from torch.nn.utils.rnn "
                "import pack_padded_sequence) and no initial state, to be unrolled"
            )
        out = static(inp.data, inp.lengths)
        state = (out[1], out[2]) if config.cell == "lstm" else out[1]
        return _Padded(out[0], inp.lengths), state

    return forward


def layer_config(layer: nn.RNNBase) -> RecurrentConfig:
    """The RecurrentConfig of a user's nn.LSTM/GRU/RNN, or ExportError for what ONNX cannot express."""
    if isinstance(layer, nn.LSTM) and layer.proj_size:
        raise ExportError("LSTM with proj_size has no ONNX LSTM equivalent; export a model without projections")
    cell = {nn.LSTM: "lstm", nn.GRU: "gru", nn.RNN: "rnn"}.get(type(layer))
    if cell is None:
        raise ExportError(f"{type(layer).__name__} is not nn.LSTM, nn.GRU or nn.RNN")
    if layer.dropout and layer.training:
        raise ExportError(f"{type(layer).__name__} is in training mode with dropout; call model.eval() first")
    return RecurrentConfig(
        input_size=layer.input_size,
        hidden_size=layer.hidden_size,
        num_layers=layer.num_layers,
        bidirectional=layer.bidirectional,
        cell=cell,
        bias=layer.bias,
        nonlinearity=getattr(layer, "nonlinearity", "tanh") if cell == "rnn" else "tanh",
    )


# How torch.onnx.export fails on a graph it cannot convert (an unsupported operator, the packed-output
# bug above): RuntimeError, or IndexError where a C++ std::out_of_range surfaces through pybind11.
_EXPORTER_FAILURES = (RuntimeError, IndexError)


def _export_failed(exc: Exception) -> ExportError:
    return ExportError(f"torch.onnx.export failed: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}")


def export_module(
    module: nn.Module,
    path: Path,
    feature_size: int | None = None,
    static: tuple[int, ...] = (),
    output_names: list[str] | None = None,
    extra_metadata: dict[str, str] | None = None,
    input_dtype: str | None = None,
) -> list[ExportResult]:
    """Export the user's own module: forward(x, lengths (batch,)) -> a tensor or a tuple of tensors,
    with pack_padded_sequence -> nn.LSTM/GRU/RNN inside. x is (batch, time, feature_size) float32,
    or (batch, time) int64 token ids where the first module applied to it is an nn.Embedding
    (`input_dtype` None: detected; "float32" or "int64": checked).

    Writes `path` (dynamic: native recurrent nodes, symbolic `batch`/`time` dims on every input and
    output) and, for each T in `static`, `<path's model folder>_static_t<T>/<version>/model.onnx`
    (every recurrent layer unrolled over T). Returns one ExportResult per file, each with its
    measured parity; raises ExportError (nothing written) when a check fails."""
    for steps in static:  # before anything is written
        check_static_length(steps)
    module = module.eval()
    _check_signature(module)
    dtype, vocab = resolve_input_dtype(module, input_dtype)
    if dtype == "int64" and feature_size is not None:
        raise ExportError(
            f"--feature-size applies to float32 features; {type(module).__name__} takes int64 token ids "
            f"x (batch, time) for nn.Embedding({vocab}, ...)"
        )
    if dtype == "float32" and (isinstance(feature_size, bool) or not isinstance(feature_size, int) or feature_size < 1):
        raise ExportError(f"feature_size must be an integer >= 1, got {feature_size!r}")
    layers = [m for m in module.modules() if isinstance(m, nn.RNNBase)]
    if not layers:
        raise ExportError(f"{type(module).__name__} contains no nn.LSTM, nn.GRU or nn.RNN")
    configs = [layer_config(layer) for layer in layers]
    for key, tensor in module.state_dict().items():
        if tensor.is_floating_point():
            _check_finite(f"{type(module).__name__}: {key}", tensor)
    names, axes = probe_axes(module, feature_size, output_names, vocab)

    def reference(x, lengths):
        with torch.no_grad():
            out = _as_tuple(module(torch.from_numpy(x), torch.from_numpy(lengths)), "forward")
        return {n: o.detach().float().numpy() for n, o in zip(names, out)}

    extra = {
        "export.source": f"module {type(module).__module__}.{type(module).__qualname__}",
        "export.recurrent_layers": json.dumps([json.loads(c.to_json()) for c in configs]),
        "export.outputs": ",".join(names),
        **({keys.INPUT: "tokens", keys.VOCAB_SIZE: str(vocab)} if vocab is not None else {}),
        **(extra_metadata or {}),
    }
    x = torch.zeros(3, 5, dtype=torch.int64) if vocab is not None else torch.zeros(3, 5, feature_size)
    lengths = torch.tensor([5, 2, 4], dtype=torch.int64)
    check = lambda tmp: check_parity(tmp, reference, feature_size or 0, vocab_size=vocab)  # noqa: E731
    try:
        results = [
            write_model(module, (x, lengths), path, axes, module, configs[0], None, extra, INPUT_NAMES, names, check)
        ]
    except _EXPORTER_FAILURES as exc:
        # torch's TorchScript exporter fails when a layer's packed output is never passed to
        # pad_packed_sequence (a module that uses only the final state): a C++ std::out_of_range
        # ("vector::_M_range_check"), raised as RuntimeError up to torch 2.14 and as IndexError (pybind11's
        # mapping of std::out_of_range) after. Export again with every packed output also unpacked as
        # an extra graph output, then drop those and the nodes only they needed; if that fails too, the
        # first failure is the one to report.
        view = _PaddedOutputsView(module, layers)
        extras = [f"_packed_output_{i}" for i in range(view.count(x, lengths))]
        if not extras:
            raise _export_failed(exc) from None
        extra_axes = {**axes, **{e: {0: BATCH, 1: TIME} for e in extras}}
        try:
            results = [
                write_model(view, (x, lengths), path, extra_axes, module, configs[0], None, extra, INPUT_NAMES,
                            names + extras, check, keep_outputs=names)
            ]  # fmt: skip
        except _EXPORTER_FAILURES:
            raise _export_failed(exc) from None
    for steps in static:
        version_dir = path.parent
        static_path = (
            version_dir.parent.parent / f"{version_dir.parent.name}_static_t{steps}" / version_dir.name / path.name
        )
        static_axes = {k: {a: n for a, n in d.items() if n != TIME} for k, d in axes.items()}
        xs = torch.zeros(2, steps, dtype=torch.int64) if vocab is not None else torch.zeros(2, steps, feature_size)
        ls = torch.tensor([steps, 1], dtype=torch.int64)
        time_axes = {n: a for n, d in axes.items() for a, v in d.items() if v == TIME}
        check_s = lambda tmp, s=steps: check_parity(  # noqa: E731
            tmp, reference, feature_size or 0, s, optimization="disable", vocab_size=vocab
        )
        view = _UnrolledView(module, steps)
        results.append(
            write_model(view, (xs, ls), static_path, static_axes, module, configs[0], steps, extra, INPUT_NAMES, names,
                   check_s, time_axes)
        )  # fmt: skip
    return results
