"""Two adapters every method can ask for: a trained copy of a whole module (`modules_to_save`, e.g. a
classifier head) and a trained bias (the `bias` option). Both satisfy the same `Adapter` protocol as LoRA. And the
merge of a method whose update depends on the base weight (`RememberedMerge`, `RotatedWeight`)."""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from splice.delta.forms import Delta, Dense


class FullCopy(nn.Module):
    """A trainable copy of `base`, one per adapter name, as PEFT's `modules_to_save` keeps."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.module = copy.deepcopy(base)
        for p in self.module.parameters():
            p.requires_grad_(True)

    takes_module_args = True  # the wrapped module's extra call arguments go to fused_forward

    def fused_forward(self, x: Tensor, base: nn.Module, *args, **kwargs) -> Tensor:
        return self.module(x, *args, **kwargs)

    def contribution(self, x: Tensor, base_out: Tensor, base: nn.Module) -> Tensor:
        return self.module(x) - base_out

    def delta(self, base: nn.Module) -> dict[str, Delta]:
        own = dict(self.module.named_parameters())
        return {n: Dense((own[n] - p).detach()) for n, p in base.named_parameters()}

    @torch.no_grad()
    def merge(self, base: nn.Module) -> dict[str, Tensor]:
        saved = {k: v.clone() for k, v in base.state_dict().items()}
        base.load_state_dict(self.module.state_dict())
        return saved

    @torch.no_grad()
    def unmerge(self, base: nn.Module, saved: dict[str, Tensor]) -> None:
        base.load_state_dict(saved)

    def peft_state(self, base: nn.Module) -> dict[str, Tensor]:
        return {k: v.detach() for k, v in self.module.state_dict().items()}

    def load_peft_state(self, state: dict[str, Tensor], base: nn.Module) -> None:
        self.module.load_state_dict(state)


class BiasShift(nn.Module):
    """A trained change of `base.bias` (PEFT's `bias="all"` trains the base bias itself; this keeps the base
    intact so that disabling or deleting the adapter gives the base back)."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.shift = nn.Parameter(torch.zeros_like(base.bias))
        self.channel_dim = isinstance(base, nn.Conv2d)

    def contribution(self, x: Tensor, base_out: Tensor, base: nn.Module) -> Tensor:
        shift = self.shift.view(-1, 1, 1) if self.channel_dim else self.shift
        return shift.to(base_out.dtype).expand_as(base_out)

    def delta(self, base: nn.Module) -> dict[str, Delta]:
        return {"bias": Dense(self.shift.detach())}

    def peft_state(self, base: nn.Module) -> dict[str, Tensor]:
        return {"bias": (base.bias + self.shift).detach()}  # PEFT stores the trained bias itself

    @torch.no_grad()
    def load_peft_state(self, state: dict[str, Tensor], base: nn.Module) -> None:
        self.shift.copy_(state["bias"] - base.bias)


class RememberedMerge:
    """merge / unmerge for an adapter whose weight update depends on the base weight (OFT's and BOFT's rotations of
    W₀, Bone's bat): merge adds `delta(base)["weight"]` and returns it, unmerge subtracts that same tensor, since
    recomputing the update from the merged weight would give another one."""

    @torch.no_grad()
    def merge(self, base: nn.Module) -> Tensor:
        update = self.delta(base)["weight"].materialize().to(base.weight.dtype)
        base.weight.add_(update)
        return update

    @torch.no_grad()
    def unmerge(self, base: nn.Module, update: Tensor) -> None:
        base.weight.sub_(update)


class RotatedWeight(RememberedMerge):
    """An adapter that rewrites W₀ as a whole (`rotated_weight(base)`: OFT, BOFT): its delta is the dense
    difference, and its merge remembers what it added."""

    def delta(self, base: nn.Module) -> dict[str, Delta]:
        with torch.no_grad():
            return {"weight": Dense((self.rotated_weight(base) - base.weight).to(base.weight.dtype))}
