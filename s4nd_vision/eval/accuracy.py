"""Top-k accuracy, shared by the trainer's validation and the resolution evaluation."""
import torch

__all__ = ['topk_hits']


def topk_hits(scores: torch.Tensor, target: torch.Tensor, k: int = 5) -> torch.Tensor:
    """Whether each row's target is among its k highest scores, by rank: `(B, C)`, `(B,)` -> bool `(B, min(k, C))`.

    Column 0 is top-1 correctness; `.any(1)` is top-k correctness (k capped at the number of classes).
    """
    return scores.topk(min(k, scores.shape[1]), dim=1).indices == target[:, None]
