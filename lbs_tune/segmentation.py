"""Semantic segmentation scores, from a confusion matrix accumulated over an evaluation split.

As fyu/drn's segment.py (`fast_hist`, `per_class_iu`) and cityscapesscripts score Cityscapes:
pixels whose target is not one of the classes (the ignore label 255) count nowhere; the IoU of
class k is TP / (TP + FP + FN) over all pixels of the split, not per image; the mean IoU
averages the classes present in the prediction or the target, leaving out those absent from
both (their IoU is 0 / 0). Pure tensor functions: accumulating the matrix on the device reads
nothing back to the host until the scores are taken.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = 255


def confusion_matrix(
    prediction: torch.Tensor, target: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """Pixel counts (num_classes, num_classes), int64: entry [t, p] counts pixels of target class
    t predicted as p. `prediction` holds class ids 0..num_classes-1 (an argmax), `target` has the
    same shape; target pixels outside 0..num_classes-1 (IGNORE_INDEX) are left out."""
    target = target.long()
    valid = (target >= 0) & (target < num_classes)
    # Ignored pixels go to cell 0 with weight 0: fixed shapes, no host sync, unlike a mask index.
    cell = torch.where(valid, target * num_classes + prediction.long(), 0)
    counts = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=target.device)
    counts.index_add_(0, cell.flatten(), valid.flatten().long())
    return counts.view(num_classes, num_classes)


def iou_per_class(confusion: torch.Tensor) -> torch.Tensor:
    """IoU of each class, float64 (num_classes,): NaN for a class absent from both prediction
    and target."""
    confusion = confusion.double()
    hits = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - hits
    return hits / union


def mean_iou(confusion: torch.Tensor) -> float:
    """The mean IoU over the classes present in the prediction or the target; NaN if none is."""
    return iou_per_class(confusion).nanmean().item()


def pixel_accuracy(confusion: torch.Tensor) -> float:
    """The fraction of scored (not ignored) pixels predicted right; NaN if there are none."""
    confusion = confusion.double()
    return (confusion.diagonal().sum() / confusion.sum()).item()
