"""Top-k accuracy, shared by the trainer's validation and the resolution evaluation."""
import torch

__all__ = ['topk_hits']


def topk_hits(scores: torch.Tensor, target: torch.Tensor, k: int = 5) -> torch.Tensor:
    """Whether each row's target is among its k highest scores, by rank: `(B, C)`, `(B,)` -> bool `(B, min(k, C))`.

    Column 0 is top-1 correctness; `.any(1)` is top-k correctness (k capped at the number of classes). A row with a
    non-finite score is never a hit: `topk` ranks NaNs in a fixed order, which would credit a fixed set of classes
    (a blow-up read as chance accuracy).
    """
    hits = scores.topk(min(k, scores.shape[1]), dim=1).indices == target[:, None]
    return hits & scores.isfinite().all(dim=1, keepdim=True)
