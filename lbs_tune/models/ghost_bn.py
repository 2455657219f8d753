"""Ghost batch norm (Hoffer et al. 2017, "Train longer, generalize better").

In training mode the batch is cut into consecutive chunks of `ghost_batch_size` examples and
each chunk is normalised with its own mean and variance. A batch that is not a multiple of the
ghost size keeps its full chunks and normalises the remainder as one last, smaller chunk; a batch
no larger than the ghost size is one chunk, i.e. plain batch norm. The running mean and variance
are updated once per chunk, in order, exactly as if the chunks had gone through `nn.BatchNorm`
one after the other. Eval mode uses the running statistics like `nn.BatchNorm`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class GhostBatchNorm(_BatchNorm):
    """Batch norm over chunks of `ghost_batch_size` examples, for inputs (N, C, *spatial).

    Same parameters, buffers and state_dict keys as `nn.BatchNorm1d/2d/3d`, so checkpoints load
    either way. The chunks are normalised together on a (chunks, ghost, C, *spatial) view.
    Without running statistics (`track_running_stats=False`) eval mode uses ghost batches too,
    as `nn.BatchNorm` then uses batch statistics.
    """

    def __init__(self, num_features: int, ghost_batch_size: int, **batch_norm_kwargs) -> None:
        if ghost_batch_size < 1:
            raise ValueError(f"ghost_batch_size must be at least 1, got {ghost_batch_size}")
        super().__init__(num_features, **batch_norm_kwargs)
        self.ghost_batch_size = ghost_batch_size

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ghost_batch_size={self.ghost_batch_size}"

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input (N, C, ...), got {input.dim()}D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Normalise `input` (N, C, *spatial); returns a tensor of the same shape and dtype."""
        self._check_input_dim(input)
        if not self.training and self.running_mean is not None:
            return F.batch_norm(
                input, self.running_mean, self.running_var, self.weight, self.bias, eps=self.eps
            )
        size = self.ghost_batch_size
        full = input.shape[0] - input.shape[0] % size
        parts = []
        if full:
            parts.append(input[:full].unflatten(0, (full // size, size)))
        if full < input.shape[0]:
            parts.append(input[full:].unsqueeze(0))
        # At most two parts (the full chunks, the remainder): a loop over parts, not chunks.
        outputs, means, variances = zip(*(self._normalise(part) for part in parts), strict=True)
        if self.training and self.track_running_stats:
            self._update_running_stats(torch.cat(means), torch.cat(variances))
        outputs = [output.flatten(0, 1) for output in outputs]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def _normalise(self, chunks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalise each chunk of `chunks` (G, n, C, *spatial) with its own statistics.

        Returns the output (same shape and dtype) and the detached per-chunk mean and unbiased
        variance, each (G, C), for the running statistics.
        """
        reduce = (1, *range(3, chunks.dim()))
        count = chunks.numel() // (chunks.shape[0] * chunks.shape[2])
        if count < 2:
            raise ValueError(
                f"expected more than 1 value per channel in a ghost batch, got {count}"
            )
        # Statistics in at least float32, as nn.BatchNorm computes them for bf16/fp16 inputs.
        wide = chunks.to(torch.promote_types(chunks.dtype, torch.float32))
        var, mean = torch.var_mean(wide, dim=reduce, correction=0, keepdim=True)
        scale = torch.rsqrt(var + self.eps)
        channel_shape = (-1,) + (1,) * (chunks.dim() - 3)
        if self.weight is not None:
            scale = scale * self.weight.view(channel_shape)
        shift = -mean * scale
        if self.bias is not None:
            shift = shift + self.bias.view(channel_shape)
        output = (wide * scale + shift).to(chunks.dtype)
        groups = chunks.shape[0]
        mean = mean.detach().reshape(groups, -1)
        unbiased = var.detach().reshape(groups, -1) * (count / (count - 1))
        return output, mean, unbiased

    def _update_running_stats(self, means: torch.Tensor, variances: torch.Tensor) -> None:
        """Fold the chunk statistics (K, C), in order, into the running mean and variance.

        The sequential updates r <- (1 - f_k) r + f_k s_k unroll to one weighted sum,
        r_K = prod_k (1 - f_k) r_0 + sum_k f_k prod_{j>k} (1 - f_j) s_k, computed on the device
        without a host sync or a loop over chunks.
        """
        chunks = means.shape[0]
        if self.momentum is None:
            # Cumulative average, like nn.BatchNorm: chunk k gets weight 1 / (batches seen).
            seen = self.num_batches_tracked + torch.arange(1, chunks + 1, device=means.device)
            factors = 1.0 / seen.to(means.dtype)
        else:
            factors = means.new_full((chunks,), self.momentum)
        self.num_batches_tracked.add_(chunks)
        kept_from = torch.cumprod((1 - factors).flip(0), 0).flip(0)
        kept_after = torch.cat([kept_from[1:], kept_from.new_ones(1)])
        # A weighted sum, not a matmul, which autocast would run in bf16/fp16.
        weights = (factors * kept_after).unsqueeze(1)
        with torch.no_grad():
            self.running_mean.mul_(kept_from[0]).add_((weights * means).sum(0))
            self.running_var.mul_(kept_from[0]).add_((weights * variances).sum(0))


def use_ghost_batch_norm(module: nn.Module, ghost_batch_size: int) -> nn.Module:
    """Replace every batch-norm layer in `module` by a `GhostBatchNorm` with the same state.

    Takes a module (changed in place) and the ghost batch size; returns the module, or the new
    layer when `module` itself is a batch norm. Layers that already are ghost keep their size.
    """
    if isinstance(module, GhostBatchNorm):
        return module
    if isinstance(module, _BatchNorm):
        reference = module.weight if module.weight is not None else module.running_mean
        factory = (
            {} if reference is None else {"device": reference.device, "dtype": reference.dtype}
        )
        ghost = GhostBatchNorm(
            module.num_features,
            ghost_batch_size,
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
            **factory,
        )
        ghost.load_state_dict(module.state_dict())
        return ghost.train(module.training)
    for name, child in module.named_children():
        setattr(module, name, use_ghost_batch_norm(child, ghost_batch_size))
    return module
