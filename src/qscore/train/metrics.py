"""Evaluation metrics with their protocols pinned (USERS.md #7: say which convention you used).

Quality (predictions vs MOS, 1-D arrays of equal length):

- ``srcc``: Spearman, ties get mid-ranks. ``krcc``: Kendall tau-b (tie-corrected).
- ``plcc``: plain Pearson on the raw predictions, no logistic fit (``PLCC_CONVENTION``): the
  models are trained with a PLCC loss, so their outputs are already linear in MOS, and a
  4-parameter fit can fail to converge or overfit small test sets.
- ``rmse``: after the least-squares *linear* map of predictions onto the MOS scale (the map that
  keeps PLCC unchanged), so it is in MOS units whatever the model's output range.

Forgery (``ForgeryMeter``, ``FORGERY_PROTOCOL``): pixel F1 and IoU at a fixed threshold of 0.5,
per image, averaged over manipulated images (IMDL-BenCo); pixel AUC per image, averaged the same
way; image AUC over all images (label: GT mask non-empty; score: the image score). Every AUC is
tie-aware (Mann-Whitney U with mid-ranks: a tied positive/negative pair counts one half).
"""

from __future__ import annotations

import math

import numpy as np

PLCC_CONVENTION = "pearson on raw predictions (no logistic fit); rmse after a least-squares linear map to MOS"
FORGERY_PROTOCOL = (
    "pixel f1/iou at threshold 0.5 and pixel auc, per image, averaged over manipulated images "
    "(non-empty GT mask; an empty prediction there scores f1 = iou = 0); authentic images "
    "(empty GT) are left out of the pixel metrics and counted in authentic_fpr (mean fraction of "
    "their pixels predicted manipulated) and image_auc (label = GT non-empty, score = image score); "
    "every auc is tie-aware (mid-ranks)"
)


def midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of a 1-D array; tied values share the mean of their ranks."""
    x = np.asarray(x).ravel()
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    starts = np.r_[0, np.flatnonzero(sorted_x[1:] != sorted_x[:-1]) + 1]
    ends = np.r_[starts[1:], x.size]
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def plcc(pred: np.ndarray, mos: np.ndarray) -> float:
    """Pearson correlation of the raw predictions with MOS (NaN if either is constant)."""
    p, m = _pair(pred, mos)
    p, m = p - p.mean(), m - m.mean()
    denom = math.sqrt(float((p * p).sum() * (m * m).sum()))
    return float((p * m).sum() / denom) if denom > 0 else math.nan


def srcc(pred: np.ndarray, mos: np.ndarray) -> float:
    """Spearman rank correlation (Pearson on mid-ranks)."""
    p, m = _pair(pred, mos)
    return plcc(midranks(p), midranks(m))


def krcc(pred: np.ndarray, mos: np.ndarray, block: int = 1024) -> float:
    """Kendall tau-b: (concordant - discordant) / sqrt((n0 - ties_pred) (n0 - ties_mos)).

    O(n^2) pair signs computed ``block`` rows at a time (memory O(block * n)).
    """
    p, m = _pair(pred, mos)
    n = p.size
    s = 0.0
    for a in range(0, n, block):
        s += float((np.sign(p[a : a + block, None] - p[None]) * np.sign(m[a : a + block, None] - m[None])).sum())
    n0 = n * (n - 1) / 2
    denom = math.sqrt((n0 - _tied_pairs(p)) * (n0 - _tied_pairs(m)))
    return s / 2 / denom if denom > 0 else math.nan


def rmse(pred: np.ndarray, mos: np.ndarray) -> float:
    """Root mean squared error after the least-squares linear map of pred onto MOS."""
    p, m = _pair(pred, mos)
    if np.ptp(p) > 0:
        slope, offset = np.polyfit(p, m, 1)
        p = slope * p + offset
    else:
        p = np.full_like(m, m.mean())
    return float(np.sqrt(((p - m) ** 2).mean()))


def quality_metrics(pred: np.ndarray, mos: np.ndarray) -> dict:
    """All quality metrics of one evaluation, with the convention written in."""
    return {
        "srcc": srcc(pred, mos),
        "plcc": plcc(pred, mos),
        "krcc": krcc(pred, mos),
        "rmse": rmse(pred, mos),
        "n": int(np.size(pred)),
        "plcc_convention": PLCC_CONVENTION,
    }


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve = Mann-Whitney U / (P N) with mid-ranks (ties count 1/2).
    NaN when only one class is present."""
    scores, labels = np.asarray(scores, dtype=np.float64).ravel(), np.asarray(labels).ravel().astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    rank_sum = float(midranks(scores)[labels].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def pixel_f1_iou(prob: np.ndarray, gt: np.ndarray, threshold: float = 0.5) -> tuple[float, float]:
    """F1 and IoU of ``prob > threshold`` against a boolean GT mask of the same (H, W).

    Empty GT (an authentic image): (NaN, NaN), i.e. not counted in the average. Empty
    prediction on a non-empty GT: (0, 0).
    """
    gt = np.asarray(gt, dtype=bool)
    if not gt.any():
        return math.nan, math.nan
    pred = np.asarray(prob) > threshold
    tp = float(np.logical_and(pred, gt).sum())
    fp, fn = float(pred.sum()) - tp, float(gt.sum()) - tp
    return 2 * tp / (2 * tp + fp + fn), tp / (tp + fp + fn)


class ForgeryMeter:
    """Accumulates per-image forgery statistics so full-size maps are never kept in memory."""

    def __init__(self, threshold: float = 0.5):
        self.threshold = threshold
        self.f1: list[float] = []
        self.iou: list[float] = []
        self.pixel_auc: list[float] = []
        self.authentic_fpr: list[float] = []
        self.scores: list[float] = []
        self.labels: list[bool] = []

    def add(self, prob: np.ndarray, gt: np.ndarray, score: float) -> dict:
        """One image: prob (H, W) in [0, 1], gt (H, W) bool, image score. Returns its row."""
        gt = np.asarray(gt, dtype=bool)
        manipulated = bool(gt.any())
        f1, iou = pixel_f1_iou(prob, gt, self.threshold)
        pix_auc = auc(prob, gt) if manipulated else math.nan
        if manipulated:
            self.f1.append(f1)
            self.iou.append(iou)
            if not math.isnan(pix_auc):
                self.pixel_auc.append(pix_auc)
        else:
            self.authentic_fpr.append(float((np.asarray(prob) > self.threshold).mean()))
        self.scores.append(float(score))
        self.labels.append(manipulated)
        return {"f1": f1, "iou": iou, "pixel_auc": pix_auc, "manipulated": manipulated}

    def result(self) -> dict:
        mean = lambda v: float(np.mean(v)) if v else math.nan  # noqa: E731
        return {
            "f1": mean(self.f1),
            "iou": mean(self.iou),
            "pixel_auc": mean(self.pixel_auc),
            "image_auc": auc(np.array(self.scores), np.array(self.labels)),
            "authentic_fpr": mean(self.authentic_fpr),
            "n_manipulated": len(self.f1),
            "n_authentic": len(self.authentic_fpr),
            "threshold": self.threshold,
            "protocol": FORGERY_PROTOCOL,
        }


def _pair(pred: np.ndarray, mos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p, m = np.asarray(pred, dtype=np.float64).ravel(), np.asarray(mos, dtype=np.float64).ravel()
    if p.size != m.size or p.size < 2:
        raise ValueError(f"need two equal-length arrays of at least 2 values, got {p.size} and {m.size}")
    return p, m


def _tied_pairs(x: np.ndarray) -> float:
    _, counts = np.unique(x, return_counts=True)
    return float((counts * (counts - 1) / 2).sum())
