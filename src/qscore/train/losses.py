"""Training losses, all in one place.

Quality models regress a score whose scale is free (a raw logit, a probability, a MOS-like
number), so their default loss is scale- and shift-invariant: ``plcc_rank_loss`` =
``plcc_loss + 0.3 * rank_loss`` (the FAST-VQA family's recipe). Every loss takes predictions and
targets of shape (B,) (any matching shape for ``l1_loss``/``eps_mse``) and returns a 0-dim fp32
tensor. Compute them in fp32: cast under autocast before calling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-8


def _standardise(x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B,) zero mean, unit (population) std; a constant batch stays all zeros."""
    x = x.float().flatten()
    return (x - x.mean()) / (x.std(unbiased=False) + EPS)


def plcc_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``1 - PLCC(pred, target)``, in [0, 2]; 0 when pred is any increasing affine map of target.

    Both vectors are z-scored first (FAST-VQA style), so the loss only sees the linear
    correlation: invariant to the scale and offset of the predictions. Needs B >= 2.
    """
    p, t = _standardise(pred), _standardise(target)
    return 1.0 - (p * t).mean()


def rank_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pairwise hinge on mis-ordered pairs of z-scored predictions (FAST-VQA's normalised rank
    loss): mean over ordered pairs (i, j) with target_i > target_j of ``relu(p_j - p_i)``.

    z-scoring makes it scale-invariant like ``plcc_loss``; 0 when the order of pred matches the
    order of target; pairs with tied targets do not count. (B,), (B,) -> 0-dim.
    """
    p, t = _standardise(pred), target.float().flatten()
    wrong = F.relu(p[None, :] - p[:, None])  # [i, j] = how far p_j is above p_i
    above = (t[:, None] > t[None, :]).float()  # [i, j] = target_i > target_j
    return (wrong * above).sum() / above.sum().clamp(min=1.0)


def plcc_rank_loss(pred: torch.Tensor, target: torch.Tensor, rank_weight: float = 0.3) -> torch.Tensor:
    """The quality models' training loss: ``plcc_loss + rank_weight * rank_loss`` (1 : 0.3)."""
    return plcc_loss(pred, target) + rank_weight * rank_loss(pred, target)


def l1_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error (RSFIQA regresses normalised MOS directly); shapes must match."""
    return F.l1_loss(pred.float(), target.float())


def dice_loss(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft Dice loss per sample, averaged: ``1 - (2 |P T| + 1) / (|P| + |T| + 1)`` over each
    (1, H, W) map; the +1 makes an empty target with an empty prediction a zero loss (authentic
    images). prob, target (B, 1, H, W) in [0, 1]."""
    p, t = prob.float().flatten(1), target.float().flatten(1)
    return (1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)).mean()


def eps_mse(eps_pred: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Diffusion epsilon-prediction loss: mean squared error between the predicted and the true
    noise, e.g. (B, 1, H, W) each (UGD-IML)."""
    return F.mse_loss(eps_pred.float(), eps.float())
