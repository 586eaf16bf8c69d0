import torch
from torch import nn

from plexus.models.layers.ops import ModelOps


class RMSNorm(nn.Module):
    """Llama's RMSNorm, computed in fp32 and cast back as HF does, so bf16
    rounding matches the reference. Given a residual, adds it first (rounded
    to the model dtype, as HF's separate add is) and returns both."""

    def __init__(self, hidden_size: int, eps: float, ops: ModelOps | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.ops = ops or ModelOps()

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return self.ops.rms_norm(x, self.weight, self.eps)
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps)


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: the weight is stored as an offset from one, x * (1 + w)."""

    def __init__(self, hidden_size: int, eps: float, ops: ModelOps | None = None) -> None:
        super().__init__(hidden_size, eps, ops)
        nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        weight = self.weight + 1.0
        if residual is None:
            return self.ops.rms_norm(x, weight, self.eps)
        return self.ops.add_rms_norm(x, residual, weight, self.eps)
