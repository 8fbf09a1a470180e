"""Dice + cross-entropy over the BraTS regions, masked to trusted pixels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from napari_unet.labels import REGIONS


def region_dice_ce(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                   smooth: float = 1.0) -> torch.Tensor:
    """logits (N, K, H, W), target (N, H, W) int64, weight (N, H, W) in [0, 1] (0 = untrusted).

    Cross-entropy over the K classes plus the soft Dice loss of each BraTS region, whose
    probability is the sum of its classes' (K=2, the binary task: the whole tumour only).
    """
    if weight is None:
        weight = torch.ones_like(target, dtype=logits.dtype)
    weight = weight.to(logits.dtype)
    denom = weight.sum().clamp_min(1.0)
    ce = (F.cross_entropy(logits.float(), target, reduction="none") * weight).sum() / denom
    probs = torch.softmax(logits.float(), dim=1)
    regions = {"WT": (1,)} if logits.shape[1] == 2 else REGIONS
    dice_losses = []
    for classes in regions.values():
        p = probs[:, list(classes)].sum(1) * weight
        t = torch.isin(target, torch.tensor(classes, device=target.device)).to(p.dtype) * weight
        inter = (p * t).sum()
        dice_losses.append(1 - (2 * inter + smooth) / (p.sum() + t.sum() + smooth))
    return ce + torch.stack(dice_losses).mean()
