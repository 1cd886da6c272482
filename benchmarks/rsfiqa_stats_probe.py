"""How much quality the measured describer sees: its 19 numbers for each whole image (one
region), ridge regression on train.csv, Spearman on val.csv (BIQ2021 by default).

    python benchmarks/rsfiqa_stats_probe.py [--data ../shared/data/biq2021]
"""

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr

from qscore.media.image import load_image
from qscore.models.rsfiqa import DIMENSIONS, MEASURED, MeasuredDescriber

parser = argparse.ArgumentParser()
parser.add_argument("--data", default="../shared/data/biq2021")
args = parser.parse_args()
describe = MeasuredDescriber()


def features(csv: str) -> tuple[np.ndarray, np.ndarray]:
    rows = pd.read_csv(Path(args.data) / csv)
    out = []
    for path in rows.path:
        image = torch.from_numpy(load_image(str(Path(args.data) / path))[0]).permute(2, 0, 1)
        e, _ = describe(image, torch.zeros(image.shape[1:], dtype=torch.long), 1)
        out.append(e[0].numpy())
    return np.stack(out), rows.mos.to_numpy()


(xt, yt), (xv, yv) = features("train.csv"), features("val.csv")
names = [*MEASURED, *(f"rating_{d}" for d in DIMENSIONS)]
for i, name in enumerate(names):
    print(f"{name:24s} val SRCC {spearmanr(xv[:, i], yv)[0]:+.3f}")
mu, sd = xt.mean(0), xt.std(0) + 1e-9
a, b = (xt - mu) / sd, (xv - mu) / sd
for lam in (1.0, 10.0, 100.0):
    w = np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ (yt - yt.mean()))
    print(f"ridge lambda {lam:g}: val SRCC {spearmanr(b @ w, yv)[0]:.3f}")
