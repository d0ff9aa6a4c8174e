"""vsops: fused PyTorch operators for learned visual-token selection (VisionSelector)."""
from vsops.budget import budget_to_k
from vsops.ops.attention_received import attention_received
from vsops.difftopk import DiffTopK, constraint_loss, difftopk, topk_mask
from vsops.info import info
from vsops.lis import lis_score
from vsops.scorer import LearnableImportanceScorer

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "budget_to_k",
    "difftopk",
    "topk_mask",
    "constraint_loss",
    "DiffTopK",
    "lis_score",
    "attention_received",
    "LearnableImportanceScorer",
    "info",
]
