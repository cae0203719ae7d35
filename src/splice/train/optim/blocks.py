"""Where the trained parameters sit in a model: its repeated layers (blocks), and the module owning each parameter.

LISA samples whole layers, HFT halves the matrices of each layer, GaLore projects the matrices inside the layers;
all three need the layer list without a table of model classes. A transformer keeps its layers in one
`nn.ModuleList` of identical blocks (BERT `encoder.layer`, Llama `model.layers`, GPT-2 `transformer.h`), so the
list of two or more modules of one class that holds the most parameters is the layer list.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from splice.errors import SpliceError


def find_layers(model: nn.Module) -> tuple[str, list[nn.Module]] | None:
    """(name, blocks) of the model's repeated layers, or None when it has no such list."""
    best: tuple[str, list[nn.Module], int] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) >= 2 and len({type(m) for m in module}) == 1:
            size = sum(p.numel() for p in module.parameters())
            if best is None or size > best[2]:
                best = (name, list(module), size)
    return None if best is None else (best[0], best[1])


@dataclass
class Unit:
    """The trained parameters one module owns directly (a Linear's weight and bias, a LoRA adapter's A and B)."""

    name: str  # the module's qualified name in its model
    module: nn.Module
    params: list[nn.Parameter] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


@dataclass
class Layout:
    """The trained parameters grouped by layer: `layers[i]` are the units inside block i, `outside` the rest
    (embeddings, final norm, head); `unowned` are trained parameters found in none of the modules."""

    layers: list[list[Unit]]
    outside: list[Unit]
    unowned: list[nn.Parameter]
    layers_name: str = ""
    prefixes: list[str] = field(default_factory=list)  # each layer's own name + "." ("encoder.layer.3.")


def layout(params: Sequence[nn.Parameter], modules: Sequence[nn.Module], who: str) -> Layout:
    """Group `params` by the layer (of `modules`' repeated layers) whose module owns them.

    Raises:
        SpliceError: no module holds a list of repeated layers (`who` names the strategy in the message).
    """
    wanted = {id(p) for p in params}
    seen: set[int] = set()
    layers: list[list[Unit]] = []
    prefixes: list[str] = []
    outside: list[Unit] = []
    found_name = ""
    for model in modules:
        found = find_layers(model)
        block_of: dict[int, int] = {}
        if found is not None:
            found_name = found_name or found[0]
            for b, block in enumerate(found[1], start=len(layers)):
                for m in block.modules():
                    block_of[id(m)] = b
            layers.extend([] for _ in found[1])
            prefixes.extend(f"{found[0]}.{j}." for j in range(len(found[1])))
        for name, module in model.named_modules():
            own = [p for p in module.parameters(recurse=False) if id(p) in wanted and id(p) not in seen]
            if not own:
                continue
            seen.update(id(p) for p in own)
            unit = Unit(name, module, own)
            b = block_of.get(id(module))
            (outside if b is None else layers[b]).append(unit)
    if not layers:
        names = ", ".join(type(m).__name__ for m in modules) or "no module"
        raise SpliceError(f"{who}: found no list of repeated layers (an nn.ModuleList of identical blocks) in {names}")
    return Layout(layers, outside, [p for p in params if id(p) not in seen], found_name, prefixes)


def drop_state(optimizer, params: Sequence[nn.Parameter]) -> None:
    """Forget the optimizer state of `params` (frozen now), so that it costs no memory."""
    for p in params:
        optimizer.state.pop(p, None)
