"""What the decomposition-based adapters share (SVFit, SORSA, SVFT, LoLDU, LoRA-SB); each method's math stays in
its own file.

- the wrapped weight as an (out, in) float32 matrix, whatever the module stores (HF Conv1D keeps it transposed);
- a thin SVD in float32 with the sign of every singular pair fixed, so that recomputing it from the same weight
  gives the same factors (the SVD is unique only up to a sign per pair, and LAPACK builds may pick differently);
- rank and field checks that fail with one line naming the field;
- `Factored`, the adapter shell for updates written as a product ΔW = B·A of an (out, k) and a (k, in) matrix:
  the forward contribution, the exact `LowRank` delta, and the folder state (each tensor saved under its own
  attribute name: `peft_keys` are attribute names).
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from splice.adapters.lora import linear_weight, lora_update, module_dims
from splice.delta.forms import Delta
from splice.errors import SpliceError

KINDS = ("linear", "conv1d")


def check_kind(method: str, base: nn.Module, kind: str) -> tuple[int, int]:
    """(in, out) of a module the method can wrap, or a SpliceError naming what it wraps."""
    if kind not in KINDS:
        raise SpliceError(f"{method} cannot wrap {type(base).__name__}; it wraps nn.Linear and HF Conv1D")
    return module_dims(base, kind)


def check_rank(value: int, in_f: int, out_f: int, name: str = "r") -> None:
    """A rank of at most min(in, out): the layer has no more singular (or LU) directions."""
    if value > min(in_f, out_f):
        raise SpliceError(f"{name}: rank {value} is larger than the layer ({in_f} → {out_f}); at most "
                          f"{min(in_f, out_f)}")


def positive_int(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SpliceError(f"{name}: must be a positive integer, got {value!r}")


def weight_matrix(base: nn.Module, kind: str) -> Tensor:
    """The base weight as an (out, in) float32 matrix (a copy, detached)."""
    return linear_weight(base, kind).detach().float()


def svd(W: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD W = U diag(S) Vh in float32, on W's device: U (out, n), S (n,) descending, Vh (n, in), n = min.

    Signs are fixed so that the largest-magnitude entry of every left singular vector is positive (the right one
    flips with it): the same weight then gives the same factors however the solver chose the signs.
    """
    U, S, Vh = torch.linalg.svd(W.float(), full_matrices=False)
    lead = U.gather(0, U.abs().argmax(0, keepdim=True)).squeeze(0)  # (n,) the largest entry of each column
    sign = torch.where(lead < 0, -1.0, 1.0).to(U.dtype)
    return U * sign, S, Vh * sign[:, None]


def dtype_of(base: nn.Module) -> torch.dtype:
    """The dtype the adapter's tensors take: the base weight's (float32 for a non-float weight)."""
    return base.weight.dtype if base.weight.is_floating_point() else torch.float32


class Factored(nn.Module):
    """An adapter whose update is ΔW = B·A, B (out, k) and A (k, in) computed by `factors()` (differentiable).

    Subclasses set `kind`, implement `factors()` and `peft_shapes`, and list in `peft_keys` the attribute names
    (parameters and buffers) that make up the adapter; the folder stores each under its own name.
    """

    peft_keys: ClassVar[tuple[str, ...]] = ()
    kind: str

    def factors(self) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def contribution(self, x: Tensor, base_out: Tensor, base: nn.Module) -> Tensor:
        B, A = self.factors()
        return ((x.to(A.dtype) @ A.t()) @ B.t()).to(base_out.dtype)  # (…, in) → (…, k) → (…, out)

    def delta(self, base: nn.Module) -> dict[str, Delta]:
        B, A = (t.detach() for t in self.factors())
        return {"weight": lora_update(B, A, 1.0, self.kind, base.weight.shape)}

    @classmethod
    def peft_missing(cls, tensors: dict[str, Tensor]) -> str | None:
        missing = [k for k in cls.peft_keys if k not in tensors]
        return f"expected {', '.join(missing)}" if missing else None

    def peft_state(self, base: nn.Module) -> dict[str, Tensor]:
        return {k: getattr(self, k).detach() for k in self.peft_keys}

    @torch.no_grad()
    def load_peft_state(self, state: dict[str, Tensor], base: nn.Module) -> None:
        for key in self.peft_keys:
            getattr(self, key).copy_(state[key])
