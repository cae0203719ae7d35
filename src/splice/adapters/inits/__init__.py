"""LoRA initialisations beyond random, one file each; `lora.py` and `adapt` dispatch on `init_lora_weights`.

A *start* is a pair (A₀, B₀) with s B₀ A₀ ≠ 0. The layer keeps the base weight untouched and subtracts the frozen
s B₀ A₀ itself, so the adapted model equals the base at initialisation and the update against the original base
is s (B A − B₀ A₀), exact and of rank 2r (what PEFT writes when it converts such an adapter for sharing).

Weight-only inits (pissa, olora) need nothing but the weight. Data-driven inits (eva, lora_ga, corda) need a few
calibration batches (`splice.adapt(model, config, calibration=batches)`), run once through the base model when
the adapter is added; eva also chooses each layer's rank, so it can leave layers unadapted.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor, nn

from splice.adapters.inits.calibrate import default_forward
from splice.adapters.inits.corda import CordaConfig, corda_start, input_covariances
from splice.adapters.inits.eva import EvaConfig, eva_starts
from splice.adapters.inits.lora_ga import LoraGAConfig, lora_ga_start, mean_gradients
from splice.adapters.inits.olora import olora_start
from splice.adapters.inits.pissa import pissa_start
from splice.errors import SpliceError

# init name → (W (out, in) float32, r, scale) → (A₀ (r, in), B₀ (out, r)): the inits that need only the weight.
WEIGHT_STARTS: dict[str, Callable[[Tensor, int, float], tuple[Tensor, Tensor]]] = {
    "pissa": pissa_start,
    "olora": olora_start,
}
DATA_INITS = ("eva", "lora_ga", "corda")
Built = list[tuple[str, nn.Module, str, nn.Module]]  # (module name, module, kind, adapter) as `adapt` builds them


def data_init(model: nn.Module, config: Any, built: Built, calibration: Iterable[Any] | None,
              calibration_loss: Callable[[Any], Tensor] | None, make: Callable[[nn.Module, str, Any], nn.Module]
              ) -> Built:
    """Initialise freshly built adapters from calibration data when `config.init_lora_weights` asks for it, or
    hand the batches to the config's own `calibrate(model, built, calibration, calibration_loss)` (LoRA-SB).

    Args:
        built: the adapters `adapt` built with `config` (nothing is wrapped yet: the model is the plain base).
        calibration: batches of model inputs (dicts for `model(**batch)`), iterated once.
        calibration_loss: batch → scalar loss; runs a batch when it is not a dict of model inputs (and gives
            lora_ga its gradient).
        make: (base module, kind, config) → a new adapter, for layers whose rank the init changes.
    Returns:
        The adapters to install (eva may drop layers and change ranks).
    """
    own = getattr(config, "calibrate", None)  # a method's own data-driven start (LoRA-SB); it checks the batches
    if own is not None:
        return own(model, built, calibration, calibration_loss)
    init = getattr(config, "init_lora_weights", None)
    if init not in DATA_INITS:
        if calibration is not None:
            unused = (f"init_lora_weights={init!r} does not use it; the data-driven inits are {', '.join(DATA_INITS)}"
                      if hasattr(config, "init_lora_weights") else f"method {config.method!r} does not use it")
            raise SpliceError(f"calibration data given, but {unused}")
        return built
    if calibration is None:
        raise SpliceError(f"init_lora_weights: {init} is data-driven; pass calibration batches "
                          "(splice.adapt(model, config, calibration=batches))")
    for name, _, kind, _ in built:
        if kind not in ("linear", "conv1d"):
            raise SpliceError(f"init_lora_weights: {init} needs linear layers; {name!r} is a {kind}")
    forward = (lambda b: calibration_loss(b)) if calibration_loss is not None else default_forward(model)
    bases = {name: (_plain(module), kind) for name, module, kind, _ in built}
    targets = {name: (base, _linear_weight(base, kind)) for name, (base, kind) in bases.items()}
    if init == "lora_ga":
        grads = weight_gradients(model, built, calibration, calibration_loss, "lora_ga")
        for name, _, kind, adapter in built:
            A, B = lora_ga_start(grads[name], targets[name][1], adapter.r, adapter.scale, config.lora_ga_config)
            adapter.start(A.to(adapter.lora_A.dtype), B.to(adapter.lora_B.dtype))
        return built
    if init == "corda":
        covariances = input_covariances(model, {n: b for n, (b, _) in bases.items()}, calibration, forward)
        for name, _, _, adapter in built:
            A, B = corda_start(targets[name][1], covariances[name], adapter.r, adapter.scale, config.corda_config)
            adapter.start(A.to(adapter.lora_A.dtype), B.to(adapter.lora_B.dtype))
        return built
    starts = eva_starts(model, targets, config.r, config.lora_alpha, config.eva_config, calibration, forward)
    out: Built = []
    for name, module, kind, adapter in built:
        rank, alpha, A = starts[name]
        if rank == 0:  # eva gave this layer no rank: it stays the base layer
            continue
        if rank != config.r or alpha != config.lora_alpha:
            adapter = make(bases[name][0], kind, dataclasses.replace(config, r=rank, lora_alpha=alpha))
        adapter.lora_A.data.copy_(A)
        adapter.lora_B.data.zero_()
        out.append((name, module, kind, adapter))
    return out


def weight_gradients(model: nn.Module, built: Built, calibration: Iterable[Any],
                     calibration_loss: Callable[[Any], Tensor] | None, who: str) -> dict[str, Tensor]:
    """Module name → mean over the calibration batches of ∂loss/∂W as an (out, in) float32 matrix (the first full
    fine-tuning gradient of each wrapped weight; Conv1D's is transposed to that shape).

    Args:
        calibration_loss: batch → scalar loss; default: the model's own `loss` on `model(**batch)`.
        who: the init's name, for messages.
    """
    forward = default_forward(model)
    loss = calibration_loss or (lambda b: _loss(forward(b), who))
    bases = {name: (_plain(module), kind) for name, module, kind, _ in built}
    grads = mean_gradients(model, {n: b.weight for n, (b, _) in bases.items()}, calibration, loss, who)
    return {n: grads[n].t() if kind == "conv1d" else grads[n] for n, (_, kind) in bases.items()}


def _loss(out: Any, who: str) -> Tensor:
    loss = getattr(out, "loss", None)
    if loss is None:
        raise SpliceError(f"{who}: the model returned no loss for a calibration batch; include labels in the "
                          "batches, or pass calibration_loss")
    return loss


def _plain(module: nn.Module) -> nn.Module:
    return module.base if hasattr(module, "adapters") else module


def _linear_weight(base: nn.Module, kind: str) -> Tensor:
    return base.weight.t() if kind == "conv1d" else base.weight


def saved_patterns(model: nn.Module, adapter_name: str, config: Any) -> dict[str, Any]:
    """PEFT's rank_pattern / alpha_pattern (and the wrapped modules, when an init left targets out) for adapters
    whose rank or alpha differs from the config's, as EVA's redistribution makes them; {} when none does."""
    from splice.adapters.inject import adapter_layers

    if getattr(config, "method", None) not in ("lora", "dora"):  # AdaLoRA keeps its own rank_pattern
        return {}
    layers = [(n, layer.adapters[adapter_name]) for n, layer in adapter_layers(model)
              if adapter_name in layer.adapters and hasattr(layer.adapters[adapter_name], "lora_A")]
    ranks, alphas, names = {}, {}, []
    for name, adapter in layers:
        names.append(name)
        if getattr(adapter, "r", config.r) != config.r:
            ranks[name] = adapter.r
        if getattr(adapter, "lora_alpha", config.lora_alpha) != config.lora_alpha:
            alphas[name] = adapter.lora_alpha
    if not ranks and not alphas:
        return {}
    return {"rank_pattern": ranks, "alpha_pattern": alphas, "target_modules": sorted(names)}


__all__ = ["DATA_INITS", "WEIGHT_STARTS", "CordaConfig", "EvaConfig", "LoraGAConfig", "data_init", "saved_patterns",
           "weight_gradients"]
