"""A plain-PyTorch varlen attention for transformers, for machines without flash-attn.

It takes what ``flash_attn_varlen_func`` takes: packed sequences (batch 1) described by
``cu_seq_lens_q/k``, and computes causal attention within each sequence with
``scaled_dot_product_attention``. Registered under a name with transformers'
``AttentionInterface`` (and the flash-attention mask convention), a model runs the packed path
of :class:`~vsops.integrations.runtime.VisionSelector` as it would with flash-attention: this is
how the packed path is tested on CPU, and a fallback for small CPU runs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vsops.integrations.runtime import register_varlen_attention

__all__ = ["varlen_reference_attention", "register_reference_varlen_attention"]

NAME = "vsops_varlen_sdpa"


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _causal(q_len: int, kv_len: int, device) -> torch.Tensor:
    """Bottom-right aligned causal mask: query i sees keys up to ``kv_len - q_len + i``."""
    q = torch.arange(q_len, device=device).unsqueeze(1)
    k = torch.arange(kv_len, device=device).unsqueeze(0)
    return k <= q + (kv_len - q_len)


def varlen_reference_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention function: ``query [B, Hq, Lq, Dh]``, ``key/value [B, Hkv, Lk, Dh]``.

    With ``cu_seq_lens_q`` and ``cu_seq_lens_k`` (int32 ``[S + 1]``, batch 1) each packed
    sequence attends to itself only; otherwise ``attention_mask`` is the 2-D padding
    mask of the flash-attention convention (``[B, Lk]``, or None). Returns
    ``(out [B, Lq, Hq, Dh], None)`` like transformers' own attention functions. Causal unless
    ``module.is_causal`` is False (a vision tower's windows attend both ways).
    """
    causal = kwargs.get("is_causal", getattr(module, "is_causal", True))
    groups = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None and cu_k is not None:
        if query.shape[0] != 1:
            raise ValueError(f"packed sequences come as batch 1, got batch {query.shape[0]}")
        out = torch.empty_like(query)
        bounds = zip(cu_q.tolist()[:-1], cu_q.tolist()[1:], cu_k.tolist()[:-1], cu_k.tolist()[1:])
        for q0, q1, k0, k1 in bounds:
            if q1 > q0:
                mask = _causal(q1 - q0, k1 - k0, query.device) if causal else None
                out[:, :, q0:q1] = F.scaled_dot_product_attention(
                    query[:, :, q0:q1], key[:, :, k0:k1], value[:, :, k0:k1], attn_mask=mask, scale=scaling
                )
    else:
        mask = _causal(query.shape[2], key.shape[2], query.device)[None, None]
        if not causal:
            mask = torch.ones_like(mask)
        if attention_mask is not None:
            mask = mask & attention_mask.bool()[:, None, None, -key.shape[2]:]
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
        # Query rows of padding see no key; SDPA gives NaN there, flash-attention zeros.
        out = torch.nan_to_num(out, nan=0.0)
    return out.transpose(1, 2).contiguous(), None


def register_reference_varlen_attention(name: str = NAME) -> str:
    """Registers :func:`varlen_reference_attention` with transformers under ``name`` (with the
    flash-attention mask convention: a 2-D padding mask, none when packed) and declares it
    varlen-capable to the selector. Returns the name, for ``attn_implementation=name`` or
    ``model.set_attn_implementation(name)``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, varlen_reference_attention)
    AttentionMaskInterface.register(name, AttentionMaskInterface._global_mapping["flash_attention_2"])
    register_varlen_attention(name)
    return name
