"""Next-token cross-entropy of logits in float32, averaged over the tokens whose label is not ignored.

Training never makes logits (the model's loss is qtrain.ops.linear_cross_entropy); this is the
full-logits reference the tests compare it with."""

import torch
import torch.nn.functional as F

from qtrain.labels import IGNORE_INDEX


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                  reduction: str = "mean") -> torch.Tensor:
    """logits [..., V] and labels [...] already aligned (labels[i] is the target of logits[i])."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=ignore_index, reduction=reduction)
