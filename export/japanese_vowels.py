"""The Japanese Vowels data set (UCI; 9 speakers, 12 LPC cepstrum coefficients per frame).

The files ship inside the `sktime` package (sktime/datasets/data/JapaneseVowels/*.ts), so they
load with no download. We read the .ts text format directly (sktime's own loader builds nested
pandas frames); tests check the result against `sktime.datasets.load_japanese_vowels`.
Needed by training and tests only, never by the server.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

FEATURES = 12
NUM_CLASSES = 9


def data_dir() -> Path:
    spec = importlib.util.find_spec("sktime")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the Japanese Vowels data ships with sktime: pip install -r requirements-dev.txt")
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "JapaneseVowels"


def load(split: str) -> tuple[list[np.ndarray], np.ndarray]:
    """(sequences, labels): each sequence (T, 12) float32; labels 0..8 (speaker 1..9)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    path = data_dir() / f"JapaneseVowels_{split.upper()}.ts"
    sequences, labels = [], []
    in_data = False
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.lower() == "@data":
            in_data = True
            continue
        if not in_data:
            continue
        *dims, label = line.split(":")
        if len(dims) != FEATURES:
            raise ValueError(f"{path}: expected {FEATURES} dimensions, got {len(dims)}")
        series = np.array([[float(v) for v in d.split(",")] for d in dims], np.float32)  # (12, T)
        sequences.append(np.ascontiguousarray(series.T))  # (T, 12)
        labels.append(int(label) - 1)
    return sequences, np.array(labels, np.int64)
