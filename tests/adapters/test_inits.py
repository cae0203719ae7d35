"""LoRA initialisations (splice.adapters.inits): each init's defining property on constructed cases, and parity with
the installed PEFT where PEFT has the init (same base → same A, B; same weights → same outputs, ≤ 1e-5 fp32)."""
from __future__ import annotations

import json

import peft
import pytest
import torch
from torch import nn

import splice
from splice.adapters.inits.olora import olora_start

ATOL = 1e-5


def close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


@torch.no_grad()
def randomise(params: list[nn.Parameter], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.add_(torch.randn(p.shape, generator=g) * 0.1 * max(p.abs().mean().item(), 1e-2))


def lora_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """'<module>.lora_A.weight' → parameter, named as PEFT names them (without its prefix and adapter name)."""
    out = {}
    for n, p in model.named_parameters():
        if "lora_" in n:
            out[n.replace("base_model.model.", "").replace(".default", "").replace(".adapters", "")
                 .removesuffix(".weight") + ".weight"] = p
    return out


# -- OLoRA ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(12, 8), (8, 12)], ids=["tall", "wide"])
def test_olora_start_is_the_leading_qr_factors(shape):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(*shape, generator=g)
    A, B = olora_start(W, 3, scale=2.0)
    assert A.shape == (3, shape[1]) and B.shape == (shape[0], 3)
    close(B.t() @ B, torch.eye(3))  # B's columns are orthonormal (Q's first r columns)
    assert torch.equal(A, A.triu())  # A is R's first r rows: upper triangular
    Q, R = torch.linalg.qr(W)
    close(B @ A, Q[:, :3] @ R[:3])  # the best span of W's first r columns
    close(W[:, :3], B @ A[:, :3])  # ... which reproduces those columns exactly


@pytest.mark.parametrize("model_name, targets", [("llama", ["q_proj", "v_proj", "down_proj"]),
                                                 ("gpt2", ["c_attn", "c_fc"])])
def test_olora_adapted_model_equals_base_at_init_and_base_weights_stay(tiny, model_name, targets):
    fam = tiny[model_name]
    model = fam.build()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    base_out = fam.output(model)
    splice.adapt(model, splice.LoraConfig(r=4, lora_alpha=8, init_lora_weights="olora", target_modules=targets))
    close(fam.output(model), base_out)
    for n, p in model.named_parameters():
        if n.replace(".base", "") in before:
            assert torch.equal(p, before[n.replace(".base", "")])
    for name, layer in splice.adapters.inject.adapter_layers(model):
        a = layer.adapters["default"]
        W = splice.adapters.lora.linear_weight(layer.base, layer.kind)
        close(a.lora_B.t() @ a.lora_B, torch.eye(4))
        assert (a.lora_A @ a.lora_A.t()).abs().max() > 0 and torch.equal(a.lora_A, a.lora_A.triu())
        close(a.lora_B @ a.lora_A @ torch.eye(W.shape[1])[:, :4], W[:, :4], atol=1e-4)


def test_olora_matches_peft_init_outputs_and_folder(tiny, tmp_path):
    """PEFT subtracts sB₀A₀ from the base weight; splice subtracts it in the layer. Same QR start; after the same
    update the same outputs; splice's folder (plain LoRA of rank 2r) loads in PEFT on the untouched base."""
    fam = tiny["llama"]
    fields = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
    theirs = peft.get_peft_model(fam.build(), peft.LoraConfig(init_lora_weights="olora", **fields)).eval()
    ours = splice.adapt(fam.build(), splice.LoraConfig(init_lora_weights="olora", **fields)).eval()
    base_out = fam.output(fam.build())
    close(fam.output(ours), base_out)
    close(fam.output(theirs), base_out)
    their_params, our_params = lora_params(theirs), lora_params(ours)
    assert their_params.keys() == our_params.keys() and len(our_params) == 12
    for n, p in our_params.items():
        close(p, their_params[n])
    randomise(list(our_params.values()), seed=3)
    with torch.no_grad():
        for n, p in our_params.items():
            their_params[n].copy_(p)
    expected = fam.output(theirs)
    assert (expected - base_out).abs().max() > 1e-3
    close(fam.output(ours), expected)

    splice.save_adapter(ours, tmp_path / "olora")
    cfg = json.loads((tmp_path / "olora" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["init_lora_weights"] is True  # a plain LoRA against the original base
    reloaded = peft.PeftModel.from_pretrained(fam.build(), tmp_path / "olora").eval()
    close(fam.output(reloaded), expected)
    close(fam.output(splice.load_adapter(fam.build(), tmp_path / "olora")), expected)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_starts_need_a_linear_layer_and_no_dora(tiny, init):
    with pytest.raises(splice.SpliceError, match=f"^init_lora_weights: {init} needs a linear layer"):
        splice.adapt(tiny["bert"].build(), splice.LoraConfig(init_lora_weights=init, target_modules=["word_embeddings"]))
    with pytest.raises(splice.SpliceError, match=f"^init_lora_weights: {init} is not available with dora"):
        splice.DoraConfig(init_lora_weights=init)
