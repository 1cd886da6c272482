"""How much quality information do Q-CLIP's frozen towers carry? A linear probe.

Ridge regression (fit on the training split, Spearman on the validation split) from two feature
sets of the frozen vision tower, adapters off:
- ``pooled``: the attention-pooled feature that feeds the projection (what Q-CLIP scores with);
- ``token stats``: per-channel mean, std and mean |x| over the tokens entering the first adapted
  block (what the trainable adapters can see and reshape).

    python benchmarks/qclip_probe.py --data /tmp/sv1k --n-train 400 [--preset tiny]

With random weights this bounds what a learning check can reach; with official PE weights it is
a quick read of the backbone's quality content. CPU is enough for the tiny preset.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from qscore import registry
from qscore.train.metrics import srcc
from qscore.types import Item


def features(model, csv: Path, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pooled (n, w), token stats (n, 3w), MOS (n,)) for the first n rows of a label file."""
    trunk = model.clip.visual.trunk
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        trunk.head.register_forward_hook(lambda m, a, o: seen.__setitem__("pooled", a[0])),
        trunk.blocks[-model.config.adapted_blocks - 1].register_forward_hook(lambda m, a, o: seen.__setitem__("tokens", o)),
    ]
    prepare, rows = model.preparer(), pd.read_csv(csv).head(n)
    pooled, stats = [], []
    for rel in rows.iloc[:, 0]:
        sample = prepare(Item(str(csv.parent / rel), rel, 0, 0))
        with torch.no_grad():
            model({"frames": sample.inputs["frames"][None]})
        t = seen["tokens"]  # (T, tokens, w)
        pooled.append(seen["pooled"].mean(0).numpy())
        stats.append(torch.cat([t.mean((0, 1)), t.std(1).mean(0), t.abs().mean((0, 1))]).numpy())
    for h in hooks:
        h.remove()
    return np.stack(pooled), np.stack(stats), rows.iloc[:, 1].to_numpy(float)


def ridge_srcc(x_train, y_train, x_val, y_val, lam: float) -> float:
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-8
    a, b = (x_train - mu) / sd, (x_val - mu) / sd
    w = np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ (y_train - y_train.mean()))
    return srcc(b @ w, y_val)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="folder with train.csv and val.csv")
    p.add_argument("--n-train", type=int, default=400)
    p.add_argument("--preset", default="tiny")
    args = p.parse_args()
    torch.manual_seed(0)
    cls = registry.get("qclip")
    model = cls(cls.make_config(args.preset)).eval()
    model.zero_shot = True  # adapters off: the frozen towers alone
    train = features(model, args.data / "train.csv", args.n_train)
    val = features(model, args.data / "val.csv", 10**9)
    for lam in (10, 100, 1000):
        pooled = ridge_srcc(train[0], train[2], val[0], val[2], lam)
        stats = ridge_srcc(train[1], train[2], val[1], val[2], lam)
        print(f"ridge lambda {lam:5}: val SRCC pooled {pooled:.3f}, token stats {stats:.3f}")


if __name__ == "__main__":
    main()
