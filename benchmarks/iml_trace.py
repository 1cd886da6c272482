"""How much a plain noise trace tells where the synthetic edits are (UGD-IML's IML, issue 16).

    python benchmarks/iml_trace.py FOLDER      # a `qscore synth forgery` folder (labels.csv)

Per manipulated image (GT over 0.3 % of it): the local energy of a high-pass residual (8 x 8
mean of |gray - Gaussian(1 px)(gray)|) as log deviation from the image's median, scored against
the GT mask (``load_mask``) as a tie-aware pixel AUC (``qscore.train.metrics.auc``) two ways
(lower energy is edited; any deviation is edited), on the image as it is and squashed to
512 x 512 first (bilinear, as UGD-IML's starter input). Prints the mean AUCs by edit kind and
over all.
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
from PIL import Image
from scipy.ndimage import gaussian_filter, uniform_filter

from qscore.media.image import load_mask
from qscore.train.metrics import auc


def deviation(gray: np.ndarray) -> np.ndarray:
    """log(local residual energy / its median over the image), (H, W)."""
    energy = uniform_filter(np.abs(gray - gaussian_filter(gray, 1.0)), 8)
    return np.log(energy + 1e-3) - np.log(np.median(energy) + 1e-3)


def main(folder: str) -> None:
    labels = pd.read_csv(f"{folder}/labels.csv")
    rows = []
    for _, r in labels[labels["mask"].notna()].iterrows():
        gray = np.asarray(Image.open(f"{folder}/{r['forged']}").convert("L"), np.float32)
        mask = load_mask(f"{folder}/{r['mask']}")
        if mask.mean() < 0.003:
            continue
        row = {"kind": r["kind"]}
        squashed = (np.asarray(Image.fromarray(gray).resize((512, 512), Image.BILINEAR)),
                    np.asarray(Image.fromarray(mask).resize((512, 512), Image.NEAREST)))
        for name, (x, m) in {"native": (gray, mask), "squash512": squashed}.items():
            d, m = deviation(x).ravel(), m.ravel()
            row[f"{name} lower"] = auc(-d, m)
            row[f"{name} any"] = auc(np.abs(d), m)
        rows.append(row)
    table = pd.DataFrame(rows)
    by_kind = table.groupby("kind").agg(["mean", "size"]).round(3)
    print(f"{len(table)} manipulated images")
    print(by_kind.loc[:, [(c, "mean") for c in table.columns[1:]] + [(table.columns[1], "size")]].to_string())
    print(table.drop(columns="kind").mean().round(3).to_string())


if __name__ == "__main__":
    main(sys.argv[1])
