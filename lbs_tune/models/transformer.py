"""A small decoder-only transformer language model, after nanoGPT (karpathy/nanoGPT, model.py).

Token embeddings plus learned position embeddings (one per position of the window, data.bptt),
dropout, `n_layer` pre-norm blocks, x + attention(LayerNorm(x)) then x + MLP(LayerNorm(x)), a
final LayerNorm and a linear head to the vocabulary. Attention is causal self-attention with
`n_head` heads through torch.nn.functional.scaled_dot_product_attention(is_causal=True), so a
position sees itself and the positions before it only; the MLP is C -> 4C -> C with GELU.
Linear layers have biases (GPT-2's choice); the head has none and, with `tied` (the default, as
nanoGPT and GPT-2), is the token embedding itself (Press & Wolf 2017). nanoGPT's initialisation:
linear and embedding weights N(0, 0.02), biases zero, and the two projections into the residual
stream of each block N(0, 0.02 / sqrt(2 n_layer)) (GPT-2).

Parameters, for a vocabulary of V words, a window of T = bptt tokens and width C = n_embd:
V C + T C + n_layer (12 C^2 + 13 C) + 2 C, and V C more untied. Each block holds two LayerNorms
(4C), the attention's input and output projections (3C^2 + 3C, C^2 + C) and the MLP's
(4C^2 + 4C, 4C^2 + C); the 2C are the final LayerNorm.

As a language model of `lbs_tune.tasks.LanguageModel` it takes (batch, bptt) token ids and a
hidden state and returns (logits, hidden). Each window attends within itself only, so there is
no state to carry from one window to the next: the hidden state is the empty tuple, which
`detach_hidden` passes through unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention of (batch, T, C) inputs."""

    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        heads = self.c_attn(x).split(width, dim=2)
        q, k, v = (h.view(batch, length, self.n_head, -1).transpose(1, 2) for h in heads)
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(batch, length, width)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """C -> 4C -> C with GELU and dropout on the output."""

    def __init__(self, n_embd: int, dropout: float) -> None:
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.c_proj = nn.Linear(4 * n_embd, n_embd)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    """One pre-norm transformer block."""

    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TransformerLanguageModel(nn.Module):
    """Embeddings, `n_layer` blocks and a (tied) head over a vocabulary of `ntokens` words, for
    windows of at most `block_size` tokens."""

    def __init__(
        self,
        ntokens: int,
        block_size: int,
        n_layer: int,
        n_head: int,
        n_embd: int,
        dropout: float,
        tied: bool,
    ) -> None:
        super().__init__()
        self.block_size = block_size
        self.wte = nn.Embedding(ntokens, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, ntokens, bias=False)
        self.apply(_init_weights)
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))
        if tied:
            self.lm_head.weight = self.wte.weight

    def forward(
        self, tokens: torch.Tensor, hidden: tuple[()] | None = None
    ) -> tuple[torch.Tensor, tuple[()]]:
        """Logits (batch, T, ntokens) for the next word after each of `tokens` (batch, T), T at
        most block_size, and the empty hidden state; `hidden` is ignored (see the module)."""
        length = tokens.shape[1]
        if length > self.block_size:
            raise ValueError(f"a window of {length} tokens is longer than {self.block_size}")
        positions = torch.arange(length, device=tokens.device)
        x = self.drop(self.wte(tokens) + self.wpe(positions))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x)), ()


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)


def transformer(
    num_classes: int,
    input_shape: Sequence[int],
    *,
    n_layer: int = 6,
    n_head: int = 6,
    n_embd: int = 384,
    dropout: float = 0.2,
    tied: bool = True,
) -> TransformerLanguageModel:
    """The transformer language model over a vocabulary of `num_classes` words, for windows of
    token ids `input_shape` = (bptt,). The defaults are nanoGPT's small character-level model
    (6 layers, 6 heads, width 384, dropout 0.2); ValueError for bad options."""
    if len(input_shape) != 1:
        raise ValueError(
            f"transformer needs an input shape (bptt,) of token ids, got {tuple(input_shape)}"
        )
    if min(n_layer, n_head, n_embd) < 1:
        raise ValueError(
            f"n_layer, n_head and n_embd must be positive, got {n_layer}, {n_head}, {n_embd}"
        )
    if n_embd % n_head:
        raise ValueError(f"n_embd {n_embd} must be a multiple of n_head {n_head}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    return TransformerLanguageModel(
        num_classes, input_shape[0], n_layer, n_head, n_embd, dropout, tied
    )
