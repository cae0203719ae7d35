"""Fused forward/backward for a frozen linear layer plus a low-rank update (LoRA, and DoRA's rescaled form).

    z = x Wᵀ + s · (drop(x) Aᵀ) Bᵀ            x: (N, in)  W: (out, in)  A: (r, in)  B: (out, r)
    y = z + b                                  (LoRA)
    y = z ∘ (m / ‖W + sBA‖_row) + b            (DoRA; the norm is a constant, DoRA paper §4.3)

Why a custom autograd function instead of `base(x) + B(A(drop(x))) * s` (what PEFT runs):
- the update is added into the base output in place with `addmm_`, so no (N, out) temporaries are made for the
  LoRA branch, its scaling, or the sum;
- what backward keeps is x (already kept by the base layer, so shared), the (N, r) product, and for dropout a
  one-byte mask instead of a second float copy of x per adapted layer;
- DoRA keeps its output instead of recomputing the base matmul, and gets ‖W + sBA‖ without materialising W + sBA:
  ‖W_j + s(BA)_j‖² = ‖W_j‖² + 2s·(W Aᵀ ∘ B)_j·1 + s²·(B (A Aᵀ) ∘ B)_j·1, (out, r) work past one read of W.
"""
from __future__ import annotations

import torch
from torch import Tensor


def dora_row_norm(weight: Tensor, A: Tensor, B: Tensor, scale: float) -> Tensor:
    """‖W + s·B·A‖ per output row, shape (out,), without forming W + s·B·A. Exact; O(out·in·r).

    ‖W‖² is recomputed on every call rather than cached: one pass over W costs little next to the activations,
    and nothing can go stale when the base weights change (a merge, a `load_state_dict`).
    """
    weight_sq = weight.pow(2).sum(1)
    wa = weight @ A.t()  # (out, r)
    gram = A @ A.t()  # (r, r)
    sq = weight_sq + 2 * scale * (wa * B).sum(1) + scale * scale * ((B @ gram) * B).sum(1)
    return sq.clamp_min(0).sqrt()


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, A, B, mag, norm, scale: float, p: float):
        in_f, out_f = weight.shape[1], weight.shape[0]
        x2 = x.reshape(-1, in_f)
        A_, B_ = A.to(x.dtype), B.to(x.dtype)
        mask = None
        if p > 0:
            mask = torch.empty_like(x2, dtype=torch.bool).bernoulli_(1 - p)
            xa = (x2 * mask) @ A_.t()
            xa.mul_(1 / (1 - p))
        else:
            xa = x2 @ A_.t()  # (N, r)
        out = x2 @ weight.t()  # (N, out)
        out.addmm_(xa, B_.t(), alpha=scale)
        col = None
        if mag is not None:
            col = (mag / norm).to(out.dtype)  # (out,)
            out.mul_(col)
        if bias is not None:
            out.add_(bias)
        out = out.view(*x.shape[:-1], out_f)
        ctx.scale, ctx.p = scale, p
        ctx.save_for_backward(x, weight, bias, A, B, mag, norm, xa, mask, col, out if mag is not None else None)
        return out

    @staticmethod
    def backward(ctx, g):
        x, weight, bias, A, B, mag, norm, xa, mask, col, out = ctx.saved_tensors
        s, p = ctx.scale, ctx.p
        out_f, in_f = weight.shape
        g2 = g.reshape(-1, out_f)
        x2 = x.reshape(-1, in_f)
        A_, B_ = A.to(g.dtype), B.to(g.dtype)
        grad_mag = grad_bias = None
        # The bias is added after DoRA's column scaling, so its gradient is the unscaled one (taken before g2 *= col).
        if bias is not None and ctx.needs_input_grad[2]:
            grad_bias = g2.sum(0)
        if mag is not None:
            if ctx.needs_input_grad[5]:
                # z = (y - b) / col recovers the pre-scaling output from the saved output, no extra matmul.
                z = out.reshape(-1, out_f)
                if bias is not None:
                    z = z - bias
                grad_mag = ((g2 * z).sum(0) / col / norm).to(mag.dtype)
            g2 = g2 * col
        gb = g2 @ B_  # (N, r)
        grad_x = grad_w = grad_A = grad_B = None
        if ctx.needs_input_grad[0]:
            grad_x = g2 @ weight
            if mask is None:
                grad_x.addmm_(gb, A_, alpha=s)
            else:
                grad_x.add_((gb @ A_) * mask, alpha=s / (1 - p))
            grad_x = grad_x.view(x.shape)
        if ctx.needs_input_grad[1]:
            grad_w = g2.t() @ x2
        if ctx.needs_input_grad[3]:
            xd = x2 if mask is None else x2 * mask * (1 / (1 - p))
            grad_A = (gb.t() @ xd).mul_(s).to(A.dtype)
        if ctx.needs_input_grad[4]:
            grad_B = (g2.t() @ xa).mul_(s).to(B.dtype)
        return grad_x, grad_w, grad_bias, grad_A, grad_B, grad_mag, None, None, None


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    A: Tensor,
    B: Tensor,
    scale: float,
    dropout: float = 0.0,
    magnitude: Tensor | None = None,
    norm: Tensor | None = None,
) -> Tensor:
    """`x Wᵀ + b + s·B A drop(x)` (or DoRA's rescaled form when `magnitude` and the detached `norm` are given).

    Args:
        x: (..., in) input.
        weight: (out, in) frozen base weight (for HF Conv1D pass `weight.t()`).
        bias: (out,) or None.
        A: (r, in) down projection; B: (out, r) up projection.
        scale: the LoRA scaling α/r (or α/√r).
        dropout: probability applied to the input of the low-rank branch only.
        magnitude: DoRA's (out,) magnitude vector m.
        norm: DoRA's (out,) ‖W + sBA‖ per row, detached.
    Returns:
        (..., out) output.
    """
    if norm is not None:
        norm = norm.detach()
    return _LoraLinear.apply(x, weight, bias, A, B, magnitude, norm, float(scale), float(dropout))
