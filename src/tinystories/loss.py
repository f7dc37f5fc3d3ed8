"""The training loss: the output head and cross-entropy fused, a slice of rows at a time.

    loss = linear_cross_entropy(hidden, head_weight, targets, softcap=None)

is `F.cross_entropy(hidden @ head_weight.T, targets, ignore_index=-1)` (optionally with soft-capped
logits, cap * tanh(logits / cap)), computed without ever holding the (N, V) logits. With a 4096-token
vocabulary and a 16 x 256 batch the logits are 67 MB; writing them, reading them back for the
softmax, writing their gradient and reading it twice more for the two backward matmuls costs more
than the head's matmuls themselves on a CPU. Here each slice of `rows` rows is multiplied, turned into
probabilities and multiplied back while it is still in the cache, and the slice's gradients are
computed at once (in the forward pass) and only scaled by the incoming gradient in backward.
The same sums in the same order every time, so it is deterministic.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -1
SLICE_FLOATS = 1 << 21  # one slice of logits: 8 MB of fp32, small enough to stay in a CPU's L3 cache


def slice_rows(vocab_size: int) -> int:
    """Rows per slice: about SLICE_FLOATS logits, at least 64 rows."""
    return max(64, SLICE_FLOATS // vocab_size)


def _slice_logits(hidden: torch.Tensor, weight: torch.Tensor, softcap: float | None):
    """(logits (n, V) in fp32 or wider, tanh of the capped logits or None) of a slice of hidden rows (n, C)."""
    logits = hidden @ weight.t()
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 under autocast: add up in fp32
    if softcap is None:
        return logits, None
    squashed = torch.tanh(logits / softcap)
    return softcap * squashed, squashed


def _slice_nll(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor):
    """(summed -log p(target) over the valid rows, log-sum-exp of each row (n,))."""
    log_total = torch.logsumexp(logits, dim=-1)  # (n,)
    target_logit = logits.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)  # (n,)
    return torch.where(valid, log_total - target_logit, 0.0).sum(), log_total


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of hidden @ weight.T against targets; gradients made in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap, rows):
        valid = targets != IGNORE_INDEX  # (N,)
        scale = 1.0 / valid.sum().clamp(min=1).to(torch.promote_types(hidden.dtype, torch.float32))
        total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
        grad_hidden = torch.empty_like(hidden)  # (N, C)
        grad_weight = torch.zeros_like(weight)  # (V, C)
        vocab = torch.arange(weight.shape[0], device=hidden.device)  # (V,)
        for start in range(0, hidden.shape[0], rows):
            h, t, keep = hidden[start:start + rows], targets[start:start + rows], valid[start:start + rows]
            logits, squashed = _slice_logits(h, weight, softcap)  # (n, V)
            nll, log_total = _slice_nll(logits, t, keep)
            total = total + nll
            # d(mean nll)/d(logits) = (softmax - one_hot(target)) / count, on valid rows only
            grad = torch.exp(logits - log_total[:, None])
            grad = torch.where(vocab[None, :] == t[:, None], grad - 1.0, grad) * (keep[:, None] * scale)
            if squashed is not None:  # through cap * tanh(z / cap): times 1 - tanh^2
                grad = grad * (1.0 - squashed * squashed)
            grad = grad.to(hidden.dtype)
            grad_hidden[start:start + rows] = grad @ weight.to(hidden.dtype)
            grad_weight += (grad.t() @ h).to(weight.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total * scale

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         softcap: float | None = None, rows: int | None = None) -> torch.Tensor:
    """Mean next-token loss (nats) of hidden (N, C) through the head weight (V, C) against targets (N,).

    Targets equal to -1 are ignored (padding). Without gradients, only the loss is computed.
    """
    rows = rows or slice_rows(weight.shape[0])
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, softcap, rows)
    valid = targets != IGNORE_INDEX
    total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
    for start in range(0, hidden.shape[0], rows):
        logits, _ = _slice_logits(hidden[start:start + rows], weight, softcap)
        total = total + _slice_nll(logits, targets[start:start + rows], valid[start:start + rows])[0]
    return total / valid.sum().clamp(min=1).to(total.dtype)
