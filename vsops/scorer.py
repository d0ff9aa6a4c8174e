"""The Learnable Importance Scorer module (VisionSelector, Section 3.2)."""
from __future__ import annotations

import torch
from torch import nn

from vsops.lis import lis_score

__all__ = ["LearnableImportanceScorer", "SCORER_PREFIXES"]

# Where checkpoints keep the scorer's weights: Qwen2.5-VL's published checkpoints (transformers
# 4.50 layout), and LLaVA-OneVision-1.5's and every checkpoint saved by transformers 4.52+.
SCORER_PREFIXES = ("visual.importance_scorer.", "model.visual.importance_scorer.")


class LearnableImportanceScorer(nn.Module):
    """Scores visual tokens by the mean of their row of ``Q K^T / sqrt(d)`` (Eq. 1-2).

    Two ``nn.Linear(hidden_size, proj_dim)`` projections, ``q_proj`` and ``k_proj``, so the
    state dict has exactly the published keys (``q_proj.weight``, ``q_proj.bias``,
    ``k_proj.weight``, ``k_proj.bias``) and loads the published VisionSelector weights
    unchanged (hidden 3584, proj 1792: 12.85M parameters for Qwen2.5-VL-7B). Weights start
    near zero (normal, std ``init_std``) and biases at zero, as published, so that a fresh
    scorer barely perturbs a frozen model.

    ``forward(x, cu_seqlens=None)`` takes ``x [B, N, hidden_size]`` (one segment per sample)
    or packed ``[total, hidden_size]`` with int32 ``cu_seqlens [S + 1]`` and returns float32
    scores ``[B, N]`` / ``[total]`` through :func:`vsops.lis_score`: the N x N matrix is never
    formed. ``x`` must have the module's dtype and device.
    """

    def __init__(
        self,
        hidden_size: int,
        proj_dim: int | None = None,
        bias: bool = True,
        init_std: float = 1e-4,
        *,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        proj_dim = hidden_size // 2 if proj_dim is None else proj_dim
        if isinstance(proj_dim, bool) or not isinstance(proj_dim, int) or proj_dim < 1:
            raise ValueError(f"proj_dim must be a positive int, got {proj_dim!r}")
        if not init_std >= 0:
            raise ValueError(f"init_std must be >= 0, got {init_std!r}")
        self.hidden_size = hidden_size
        self.proj_dim = proj_dim
        self.init_std = init_std
        self.q_proj = nn.Linear(hidden_size, proj_dim, bias=bias, device=device, dtype=dtype)
        self.k_proj = nn.Linear(hidden_size, proj_dim, bias=bias, device=device, dtype=dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for proj in (self.q_proj, self.k_proj):
            nn.init.normal_(proj.weight, std=self.init_std)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, proj_dim={self.proj_dim}"

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        return lis_score(
            x,
            self.q_proj.weight,
            self.q_proj.bias,
            self.k_proj.weight,
            self.k_proj.bias,
            cu_seqlens=cu_seqlens,
        )
