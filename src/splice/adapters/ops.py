"""Fused forward/backward for a frozen linear layer plus a low-rank update (LoRA, and DoRA's rescaled form).

    z = x Wᵀ + s · (drop(x) Aᵀ) Bᵀ            x: (N, in)  W: (out, in)  A: (r, in)  B: (out, r)
    y = z + b                                  (LoRA)
    y = z ∘ c + b,  c = m / ‖W + sBA‖_row      (DoRA; the norm is a constant in backward, DoRA paper §4.3)

Why a custom autograd function instead of `base(x) + B(A(drop(x))) * s` (what PEFT runs):

- Without dropout, and when the batch has enough rows, the update is folded into the weight first:
  W' = W + s·B·A costs out·in·r, far less than the (N, in) × (in, out) matmul, and then the layer costs exactly
  one matmul forward and one backward for grad_x, the same as the frozen layer alone. DoRA folds its column scale
  in as well (y = x (c ∘ W')ᵀ + b) and reads ‖W' row‖ off the folded weight. What remains extra is four skinny
  (N × r) products for the gradients of A and B.
- Otherwise (dropout, or a handful of rows as in token-by-token decoding) the low-rank branch is added into the
  base output in place with `addmm_`, without (N, out) temporaries.
- Backward keeps x (the base layer keeps it anyway, so shared), at most an (N, r) product, for dropout a one-byte
  mask instead of a second float copy of x per layer, and for DoRA its output (shared with the next layer's input
  in most models) instead of a second (N, out) tensor.
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


def fold_pays(rows: int, in_f: int, out_f: int) -> bool:
    """Whether forming W + sBA (out·in·r) is cheaper than the factored branch (rows·r·(in + out) plus passes)."""
    return rows * (in_f + out_f) >= in_f * out_f


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, A, B, mag, scale: float, p: float, fold: bool | None):
        out_f, in_f = weight.shape
        x2 = x.reshape(-1, in_f)
        A_, B_ = A.to(x.dtype), B.to(x.dtype)
        fold = (p == 0 and fold_pays(x2.shape[0], in_f, out_f)) if fold is None else (fold and p == 0)
        mask = xa = col = None
        if fold or mag is not None:
            folded = torch.addmm(weight, B_, A_, alpha=scale)  # W' = W + sBA, (out, in)
        if mag is not None:
            col = mag.to(x.dtype) / folded.norm(dim=1).detach()  # c = m / ‖W'‖_row, (out,)
        if fold:
            w = folded if col is None else folded * col[:, None]
            out = torch.addmm(bias, x2, w.t()) if bias is not None else x2 @ w.t()
        else:
            if p > 0:
                mask = torch.empty_like(x2, dtype=torch.bool).bernoulli_(1 - p)
                xa = ((x2 * mask) @ A_.t()).mul_(1 / (1 - p))  # (N, r)
            else:
                xa = x2 @ A_.t()
            out = x2 @ weight.t()
            out.addmm_(xa, B_.t(), alpha=scale)
            if col is not None:
                out.mul_(col)
            if bias is not None:
                out.add_(bias)
        out = out.view(*x.shape[:-1], out_f)
        ctx.scale, ctx.p, ctx.fold = scale, p, fold
        ctx.save_for_backward(x, weight, bias, A, B, mag, xa, mask, col, out if mag is not None else None)
        return out

    @staticmethod
    def backward(ctx, g):
        x, weight, bias, A, B, mag, xa, mask, col, out = ctx.saved_tensors
        s, p = ctx.scale, ctx.p
        out_f, in_f = weight.shape
        g2, x2 = g.reshape(-1, out_f), x.reshape(-1, in_f)
        A_, B_ = A.to(g.dtype), B.to(g.dtype)
        Bc = B_ if col is None else B_ * col[:, None]  # (g ∘ c) B = g (c ∘ B): no (N, out) product needed
        gb = g2 @ Bc  # (N, r)
        grad_x = grad_w = grad_bias = grad_A = grad_B = grad_mag = None
        if ctx.needs_input_grad[0]:
            if ctx.fold:
                w = torch.addmm(weight, B_, A_, alpha=s)
                grad_x = g2 @ (w if col is None else w * col[:, None])
            else:
                grad_x = g2 @ (weight if col is None else weight * col[:, None])
                if mask is None:
                    grad_x.addmm_(gb, A_, alpha=s)
                else:
                    grad_x.add_((gb @ A_) * mask, alpha=s / (1 - p))
            grad_x = grad_x.view(x.shape)
        if ctx.needs_input_grad[1]:
            grad_w = (g2 if col is None else g2 * col).t() @ x2
        if bias is not None and ctx.needs_input_grad[2]:
            grad_bias = g2.sum(0)
        if ctx.needs_input_grad[3]:
            xd = x2 if mask is None else x2 * mask * (1 / (1 - p))
            grad_A = (gb.t() @ xd).mul_(s).to(A.dtype)
        if ctx.needs_input_grad[4]:
            xa = x2 @ A_.t() if xa is None else xa
            grad_B = (g2.t() @ xa).mul_(s)
            grad_B = (grad_B if col is None else grad_B * col[:, None]).to(B.dtype)
        if mag is not None and ctx.needs_input_grad[5]:
            # ∂L/∂m_j = Σ_i g_ij z_ij / ‖W'_j‖ with z = (y − b) / c, and c·‖W'_j‖ = m_j: read off the saved output.
            y = out.reshape(-1, out_f)
            gy = (g2 * y).sum(0)  # not einsum("ij,ij->j"): on CPU that is ~20× slower for these shapes
            if bias is not None:
                gy = gy - bias * (g2.sum(0) if grad_bias is None else grad_bias)
            grad_mag = (gy / mag.to(gy.dtype)).to(mag.dtype)
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
    fold: bool | None = None,
) -> Tensor:
    """`x Wᵀ + b + s·B A drop(x)`, or DoRA's `c ∘ (x Wᵀ + s·B A drop(x)) + b` when `magnitude` is given.

    Args:
        x: (..., in) input.
        weight: (out, in) frozen base weight (for HF Conv1D pass `weight.t()`).
        bias: (out,) or None.
        A: (r, in) down projection; B: (out, r) up projection.
        scale: the LoRA scaling α/r (or α/√r).
        dropout: probability applied to the input of the low-rank branch only.
        magnitude: DoRA's (out,) magnitude vector m; the row norm ‖W + sBA‖ is computed here, detached.
        fold: fold sBA into the weight (True), keep it factored (False), or choose by cost (None). Folding is
            never used with dropout, which must not touch the base branch.
    Returns:
        (..., out) output.
    """
    return _LoraLinear.apply(x, weight, bias, A, B, magnitude, float(scale), float(dropout), fold)
