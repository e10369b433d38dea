# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""Support <-> query prototype interaction of IPLSL.

Chen, Du et al., "Interactive prototype learning and self-learning for few-shot medical image segmentation",
Artificial Intelligence in Medicine 2025, doi 10.1016/j.artmed.2025.103183 (interactive prototype learning).
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["PrototypeInteractionBlock"]


class PrototypeInteractionBlock(nn.Module):
    """
    Two-way cross-attention between support and query prototypes.

    Support prototypes attend to the query prototypes and vice versa with one shared multi-head attention
    (pre-norm, residual), followed by a shared residual MLP. Each set thus absorbs what the other set has
    learned about the same image pair: the support prototypes adapt to the query's appearance, and the
    query prototypes (pooled from an initial, noisy prediction) are corrected by the support. The exchange is
    between prototypes of the same class (the method's intra-class interaction): with ``classes`` given, a token
    attends only to the other set's tokens of its class (and to itself, so a token with no partner keeps its
    value); with ``query_valid`` given, query prototypes pooled from too few voxels are never attended to. Tokens
    carry no positional or class encoding, so the block is equivariant to a joint permutation of the classes.

    Args:
        dim: prototype channels ``C`` (divisible by ``num_heads``).
        num_heads: attention heads. Defaults to 4.
        mlp_ratio: hidden width of the MLP relative to ``dim``. Defaults to 2.0.
        dropout: dropout of attention and MLP. Defaults to 0.0.

    Inputs/outputs: ``support_prototypes`` and ``query_prototypes`` of shape ``(B, N, C)`` (``N`` tokens: classes,
    or class slots), optional ``classes`` ``(N,)`` (the class of each token) and ``query_valid`` ``(B, N)``
    -> refined tensors of the same shapes.

    Raises:
        ValueError: when ``dim`` is not positive or not divisible by ``num_heads``, or ``mlp_ratio <= 0``.
    """

    def __init__(self, dim: int, num_heads: int = 4, mlp_ratio: float = 2.0, dropout: float = 0.0) -> None:
        super().__init__()
        if dim < 1 or num_heads < 1 or dim % num_heads != 0:
            raise ValueError(f"dim must be a positive multiple of num_heads, but got dim={dim}, num_heads={num_heads}.")
        if mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, but got {mlp_ratio}.")
        hidden = max(1, int(round(dim * mlp_ratio)))
        self.norm_target = nn.LayerNorm(dim)
        self.norm_source = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout)
        )

    def _attend(self, target: torch.Tensor, source: torch.Tensor, blocked: torch.Tensor | None) -> torch.Tensor:
        keys = self.norm_source(source)
        if blocked is None:
            update, _ = self.attention(self.norm_target(target), keys, keys)
        else:  # keys: the source tokens, then the target tokens, of which each row may only see itself
            keys = torch.cat([keys, self.norm_source(target)], dim=1)
            num = target.shape[1]
            self_only = ~torch.eye(num, dtype=torch.bool, device=target.device).expand(blocked.shape[0], num, num)
            mask = torch.cat([blocked, self_only], dim=2).repeat_interleave(self.attention.num_heads, dim=0)
            update, _ = self.attention(self.norm_target(target), keys, keys, attn_mask=mask)
        target = target + update
        return target + self.mlp(self.norm_mlp(target))

    def forward(
        self,
        support_prototypes: torch.Tensor,
        query_prototypes: torch.Tensor,
        classes: torch.Tensor | None = None,
        query_valid: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if support_prototypes.ndim != 3 or support_prototypes.shape != query_prototypes.shape:
            raise ValueError(
                "support and query prototypes must both be (B, N, C), but got "
                f"{list(support_prototypes.shape)} and {list(query_prototypes.shape)}."
            )
        batch, num = support_prototypes.shape[:2]
        if classes is None and query_valid is None:
            blocked_from_query = blocked_from_support = None
        else:
            device = support_prototypes.device
            same = torch.ones(num, num, dtype=torch.bool, device=device)
            if classes is not None:
                classes = classes.to(device)
                same = classes[:, None] == classes[None, :]
            allowed = same.expand(batch, num, num)
            valid = torch.ones(batch, num, dtype=torch.bool, device=device) if query_valid is None else query_valid
            blocked_from_query = ~(allowed & valid[:, None, :].to(torch.bool))
            blocked_from_support = ~allowed
        # both directions read the inputs, not each other's output: a symmetric exchange
        refined_support = self._attend(support_prototypes, query_prototypes, blocked_from_query)
        refined_query = self._attend(query_prototypes, support_prototypes, blocked_from_support)
        return refined_support, refined_query
