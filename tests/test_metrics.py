"""Metrics against scipy (correlations) and hand-worked cases (F1/IoU, tie-aware AUC)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from qscore.train import metrics as M


@pytest.fixture(params=[0, 1, 2])
def pair(request):
    rng = np.random.default_rng(request.param)
    mos = rng.normal(size=200)
    pred = mos + rng.normal(scale=0.8, size=200)
    if request.param == 2:  # heavy ties on both sides
        mos, pred = np.round(mos), np.round(pred * 2) / 2
    return pred, mos


def test_correlations_match_scipy(pair):
    pred, mos = pair
    assert M.srcc(pred, mos) == pytest.approx(stats.spearmanr(pred, mos).statistic, abs=1e-12)
    assert M.plcc(pred, mos) == pytest.approx(stats.pearsonr(pred, mos).statistic, abs=1e-12)
    assert M.krcc(pred, mos, block=7) == pytest.approx(stats.kendalltau(pred, mos).statistic, abs=1e-12)
    np.testing.assert_allclose(M.midranks(pred), stats.rankdata(pred))


def test_rmse_is_after_linear_map():
    mos = np.array([1.0, 2.0, 3.0, 4.0])
    assert M.rmse(10 * mos + 5, mos) == pytest.approx(0.0, abs=1e-9)  # an affine map costs nothing
    pred = np.array([0.0, 1.0, 0.0, 1.0])
    fit = np.polyval(np.polyfit(pred, mos, 1), pred)
    assert M.rmse(pred, mos) == pytest.approx(np.sqrt(((fit - mos) ** 2).mean()))
    out = M.quality_metrics(pred, mos)
    assert out["n"] == 4 and "no logistic fit" in out["plcc_convention"]


def test_constant_prediction_is_nan_not_crash():
    assert math.isnan(M.plcc(np.ones(5), np.arange(5.0)))
    assert math.isnan(M.srcc(np.ones(5), np.arange(5.0)))
    with pytest.raises(ValueError):
        M.plcc(np.ones(1), np.ones(1))


def test_auc_hand_cases_with_ties():
    assert M.auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)  # sklearn's example
    assert M.auc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == pytest.approx(0.5)  # all tied: one half each
    # pos {0.5, 0.9}, neg {0.5, 0.1}: pairs (0.5,0.5)=1/2, (0.5,0.1)=1, (0.9,*)=1+1 -> 3.5/4
    assert M.auc([0.5, 0.9, 0.5, 0.1], [1, 1, 0, 0]) == pytest.approx(3.5 / 4)
    assert math.isnan(M.auc([0.1, 0.2], [1, 1]))
    rng = np.random.default_rng(0)
    s, y = np.round(rng.random(500), 1), rng.random(500) < 0.3
    u = stats.mannwhitneyu(s[y], s[~y]).statistic
    assert M.auc(s, y) == pytest.approx(u / (y.sum() * (~y).sum()))


def test_pixel_f1_iou_hand_cases():
    gt = np.zeros((4, 4), bool)
    gt[:2, :2] = True  # 4 pixels
    prob = np.zeros((4, 4))
    prob[:2, :3] = 0.9  # 6 predicted, 4 of them right
    f1, iou = M.pixel_f1_iou(prob, gt)
    assert f1 == pytest.approx(2 * 4 / (2 * 4 + 2 + 0)) and iou == pytest.approx(4 / 6)
    assert M.pixel_f1_iou(np.full((4, 4), 0.5), gt) == (0.0, 0.0)  # 0.5 is not above the threshold
    assert all(math.isnan(v) for v in M.pixel_f1_iou(prob, np.zeros((4, 4), bool)))


def test_forgery_meter_protocol():
    meter = M.ForgeryMeter()
    gt = np.zeros((4, 4), bool)
    gt[0] = True
    meter.add(gt * 0.9, gt, score=0.9)  # perfect
    meter.add(np.zeros((4, 4)), gt, score=0.2)  # missed: f1 0
    meter.add(np.eye(4) * 0.9, np.zeros((4, 4), bool), score=0.3)  # authentic, 4/16 false positives
    out = meter.result()
    assert out["f1"] == pytest.approx(0.5) and out["iou"] == pytest.approx(0.5)
    assert out["pixel_auc"] == pytest.approx((1.0 + 0.5) / 2)
    assert out["image_auc"] == pytest.approx(0.5)  # scores 0.9, 0.2 vs 0.3
    assert out["authentic_fpr"] == pytest.approx(0.25)
    assert (out["n_manipulated"], out["n_authentic"]) == (2, 1) and "0.5" in out["protocol"]
