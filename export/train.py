"""Train the speaker classifier on Japanese Vowels: `python -m export.train` (`make train`).

Seeded and CPU-only; about 15 s on a 2-core machine (12 s training). Writes a small checkpoint (committed in
the repo) so that `make export` and `make serve` need neither training nor the data set.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from export import japanese_vowels as jv
from export.classifier import SequenceClassifier
from export.model import LSTMConfig

CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "speaker_id.pt"
CONFIG = LSTMConfig(input_size=jv.FEATURES, hidden_size=64, num_layers=2, bidirectional=True)


def pad(sequences: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.int64)
    x = torch.zeros(len(sequences), int(lengths.max()), sequences[0].shape[1])  # (B, T, F)
    for i, s in enumerate(sequences):
        x[i, : len(s)] = torch.from_numpy(s)
    return x, lengths


def accuracy(model: SequenceClassifier, sequences: list[np.ndarray], labels: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        x, lengths = pad(sequences)
        logits, _ = model(x, lengths)
    return float((logits.argmax(1).numpy() == labels).mean())


def train(
    epochs: int = 40, seed: int = 0, lr: float = 3e-3, batch: int = 16, progress: bool = True, log=print
) -> tuple[SequenceClassifier, dict]:
    torch.manual_seed(seed)
    torch.set_num_threads(1)  # small model: one thread is fastest here and keeps runs repeatable
    rng = np.random.default_rng(seed)
    train_x, train_y = jv.load("train")
    test_x, test_y = jv.load("test")
    model = SequenceClassifier(CONFIG, jv.NUM_CLASSES)
    frames = np.concatenate(train_x)  # (sum T, 12): normalisation from the training set only
    model.mean.copy_(torch.from_numpy(frames.mean(0)))
    model.std.copy_(torch.from_numpy(frames.std(0)))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    loss_fn = nn.CrossEntropyLoss()
    try:
        from tqdm import tqdm
    except ImportError:  # the bar is a nicety; the per-epoch lines carry the information
        progress = False
    bar = tqdm(total=epochs, desc="train", unit="epoch", file=sys.stderr) if progress else None
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        order = rng.permutation(len(train_x))
        total_loss, correct = 0.0, 0
        for i in range(0, len(order), batch):
            idx = order[i : i + batch]
            x, lengths = pad([train_x[j] for j in idx])
            y = torch.from_numpy(train_y[idx])
            logits, _ = model(x, lengths)
            loss = loss_fn(logits, y)
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            total_loss += loss.item() * len(idx)
            correct += int((logits.argmax(1) == y).sum())
        sched.step()
        line = f"epoch {epoch:3d}  loss {total_loss / len(train_x):.4f}  train acc {correct / len(train_x):.4f}"
        if bar is not None:
            bar.update(1)
            bar.write(line)
        else:
            log(line)
    if bar is not None:
        bar.close()
    result = {
        "train_accuracy": accuracy(model, train_x, train_y),
        "test_accuracy": accuracy(model, test_x, test_y),
        "seconds": time.perf_counter() - start,
        "epochs": epochs,
        "seed": seed,
        "lr": lr,
        "batch": batch,
        "config": json.loads(CONFIG.to_json()),
        "torch": str(torch.__version__),
    }
    return model.eval(), result


def save(model: SequenceClassifier, result: dict, path: Path = CHECKPOINT) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "state_dict": model.state_dict(),
            "config": model.config.to_json(),
            "num_classes": model.num_classes,
            "result": result,
        },
        tmp,
    )
    tmp.replace(path)


def load_checkpoint(path: Path = CHECKPOINT) -> tuple[SequenceClassifier, dict]:
    data = torch.load(path, map_location="cpu", weights_only=True)
    model = SequenceClassifier(LSTMConfig.from_json(data["config"]), data["num_classes"])
    model.load_state_dict(data["state_dict"])
    return model.eval(), data["result"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.train", description=__doc__)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=CHECKPOINT)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    model, result = train(args.epochs, args.seed, progress=not args.no_progress)
    save(model, result, args.out)
    print(
        f"test accuracy {result['test_accuracy']:.4f} (train {result['train_accuracy']:.4f}) "
        f"in {result['seconds']:.1f} s -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
