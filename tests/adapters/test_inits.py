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


def same_start_then_same_step(fam, ours: nn.Module, theirs: nn.Module, n_params: int) -> torch.Tensor:
    """splice's and PEFT's LoRA factors agree at the start; after the same random update on both (a stand-in for a
    training step), their outputs agree too. Returns that output, for the saved folders to be checked against."""
    their_params, our_params = lora_params(theirs), lora_params(ours)
    assert their_params.keys() == our_params.keys() and len(our_params) == n_params
    for n, p in our_params.items():
        close(p, their_params[n])
    randomise(list(our_params.values()), seed=3)
    with torch.no_grad():
        for n, p in our_params.items():
            their_params[n].copy_(p)
    expected = fam.output(theirs)
    assert (expected - fam.output(fam.build())).abs().max() > 1e-3
    close(fam.output(ours), expected)
    return expected


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
    expected = same_start_then_same_step(fam, ours, theirs, n_params=12)

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


# -- EVA -----------------------------------------------------------------------------------------------------------
class TwoLayers(nn.Module):
    """Two linear layers fed separate inputs, so each one's input statistics are chosen by the test."""

    def __init__(self):
        super().__init__()
        self.one, self.two = nn.Linear(6, 5), nn.Linear(6, 5)

    def forward(self, a, b):
        return torch.cat([self.one(a), self.two(b)], -1)


def calibration_batches(seed: int = 0, batches: int = 3):
    """Layer one's inputs vary along one direction (plus a little noise); layer two's along all six equally."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(6, generator=g)
    out = []
    for _ in range(batches):
        a = torch.randn(40, 1, generator=g) * 3 * direction + 0.01 * torch.randn(40, 6, generator=g) + 1.0
        b = torch.randn(40, 6, generator=g) - 2.0
        out.append({"a": a, "b": b})
    return out


def top_right_singular_vectors(x: torch.Tensor, k: int) -> torch.Tensor:
    """The top-k right-singular vectors of the centred rows of `x`, signed as PEFT signs them."""
    _, _, Vh = torch.linalg.svd(x - x.mean(0), full_matrices=False)
    Vh = Vh[:k]
    return Vh * torch.sign(Vh.gather(1, Vh.abs().argmax(1, keepdim=True)))


def test_eva_A_is_the_top_right_singular_vectors_of_the_layer_inputs():
    torch.manual_seed(0)
    model, data = TwoLayers(), calibration_batches()
    x = {"a": torch.cat([d["a"] for d in data]), "b": torch.cat([d["b"] for d in data])}
    base_out = model(**x).detach()
    cfg = splice.LoraConfig(r=2, lora_alpha=4, target_modules=["one", "two"], init_lora_weights="eva",
                            eva_config={"rho": 1.0})  # rho 1: no redistribution, both layers keep r = 2
    splice.adapt(model, cfg, calibration=data)
    for name in ("one", "two"):
        adapter = getattr(model, name).adapters["default"]
        close(adapter.lora_A, top_right_singular_vectors(x["a" if name == "one" else "b"].double(), 2).float())
        assert torch.equal(adapter.lora_B, torch.zeros_like(adapter.lora_B))
    close(model(**x), base_out)  # B = 0: the adapted model starts as the base


def test_eva_redistributes_rank_by_explained_variance_and_saves_the_pattern(tmp_path):
    torch.manual_seed(0)
    model, data = TwoLayers(), calibration_batches()
    cfg = splice.LoraConfig(r=2, lora_alpha=4, target_modules=["one", "two"], init_lora_weights="eva",
                            eva_config={"rho": 2.0})
    splice.adapt(model, cfg, calibration=data)
    # layer one's variance is all in one direction: it needs rank 1; the budget of 2 × 2 goes to layer two
    one, two = model.one.adapters["default"], model.two.adapters["default"]
    assert (one.r, two.r) == (1, 3)
    assert (one.scale, two.scale) == (2.0, 2.0) and (one.lora_alpha, two.lora_alpha) == (2.0, 6.0)
    randomise(splice.trainable_parameters(model), seed=1)
    x = {"a": torch.randn(4, 6), "b": torch.randn(4, 6)}
    expected = model(**x).detach()
    splice.save_adapter(model, tmp_path / "eva")
    cfg = json.loads((tmp_path / "eva" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == {"one": 1, "two": 3} and cfg["alpha_pattern"] == {"one": 2.0, "two": 6.0}
    torch.manual_seed(0)
    close(splice.load_adapter(TwoLayers(), tmp_path / "eva")(**x), expected)
    torch.manual_seed(0)
    close(peft.PeftModel.from_pretrained(TwoLayers(), tmp_path / "eva")(**x), expected)


def test_eva_can_leave_a_layer_unadapted():
    torch.manual_seed(0)
    model = TwoLayers()
    g = torch.Generator().manual_seed(0)
    plane = torch.linalg.qr(torch.randn(6, 2, generator=g))[0].t()  # two orthonormal directions
    # layer two's inputs spread over a plane (ratios ½, ½), layer one's over all six directions (about ⅙ each):
    # the budget of 2 × r = 2 goes to layer two, and layer one stays the plain base layer
    data = [{"a": torch.randn(300, 6, generator=g), "b": torch.randn(300, 2, generator=g) @ plane} for _ in range(2)]
    cfg = splice.LoraConfig(r=1, target_modules=["one", "two"], init_lora_weights="eva", eva_config={"rho": 2.0})
    splice.adapt(model, cfg, calibration=data)
    assert isinstance(model.one, nn.Linear) and model.two.adapters["default"].r == 2


def test_eva_matches_peft(tiny, tmp_path):
    """With one calibration batch and 2·round(ρr) ≥ in, PEFT's randomised incremental PCA is exact, so the two agree:
    same ranks, alphas and A; and the folders interchange. Targets have distinct inputs (no ties to break)."""
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    fam = tiny["llama"]
    data = fam.batch(rows=4, seed=3)
    data["attention_mask"] = torch.ones_like(data["input_ids"])
    data["attention_mask"][1, -2:] = 0  # padding is left out of the statistics by both
    fields = dict(r=8, lora_alpha=8, target_modules=["q_proj", "o_proj", "up_proj"])
    theirs = peft.get_peft_model(fam.build(), peft.LoraConfig(init_lora_weights="eva",
                                                              eva_config=peft.EvaConfig(rho=2.0), **fields))
    initialize_lora_eva_weights(theirs, dataloader=[data], show_progress_bar=False)
    ours = splice.adapt(fam.build(), splice.LoraConfig(init_lora_weights="eva", **fields), calibration=[data])
    theirs.eval(), ours.eval()
    ranks = {n: p.shape[0] for n, p in lora_params(ours).items() if "lora_A" in n}
    assert len(set(ranks.values())) > 1  # the redistribution moved rank between layers
    assert theirs.peft_config["default"].rank_pattern == {n.removesuffix(".lora_A.weight"): r
                                                         for n, r in ranks.items() if r != 8}
    expected = same_start_then_same_step(fam, ours, theirs, n_params=12)
    splice.save_adapter(ours, tmp_path / "ours")
    close(fam.output(peft.PeftModel.from_pretrained(fam.build(), tmp_path / "ours")), expected)
    theirs.save_pretrained(tmp_path / "theirs")
    close(fam.output(splice.load_adapter(fam.build(), tmp_path / "theirs")), expected)


# -- LoRA-GA -------------------------------------------------------------------------------------------------------
class Probe(nn.Module):
    """One linear layer and the loss Σ (W x) · t, whose gradient in W is Σ t xᵀ: known in closed form."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(10, 8, bias=False)

    def forward(self, x, t):
        return (self.proj(x) * t).sum()


def test_lora_ga_A_and_B_come_from_the_svd_of_the_mean_gradient():
    torch.manual_seed(0)
    model = Probe()
    g = torch.Generator().manual_seed(1)
    data = [{"x": torch.randn(16, 10, generator=g), "t": torch.randn(16, 8, generator=g)} for _ in range(3)]
    grad = sum(d["t"].t() @ d["x"] for d in data) / len(data)  # (8, 10): the mean of ∂loss/∂W over batches
    x = torch.randn(5, 10, generator=g)
    base_out = model.proj(x).detach()
    weight = model.proj.weight.detach().clone()
    cfg = splice.LoraConfig(r=2, lora_alpha=4, target_modules=["proj"], init_lora_weights="lora_ga")
    splice.adapt(model, cfg, calibration=data, calibration_loss=lambda b: model(**b))
    adapter = model.proj.adapters["default"]
    U, S, Vh = torch.linalg.svd(grad)
    gamma = 8 ** 0.25 / 16 ** 0.5  # the stable scale out^¼ / √γ
    for i in range(2):  # each up to the sign an SVD may give a singular pair
        sign_a = torch.sign(adapter.lora_A[i] @ Vh[i])
        close(adapter.lora_A[i] * sign_a, Vh[i])  # A: the top-r right-singular vectors
        sign_b = torch.sign(adapter.lora_B[:, i] @ U[:, 2 + i])
        close(adapter.lora_B[:, i] * sign_b, U[:, 2 + i] * S[2 + i] * gamma, atol=1e-4)  # B: the next r, scaled
    assert torch.equal(model.proj.weight, weight)  # the base weight is untouched ...
    close(model.proj(x), base_out)  # ... and the adapted layer starts as the base (s B₀A₀ is subtracted)
    assert not model.proj.weight.requires_grad


def test_lora_ga_matches_peft(tiny, tmp_path, monkeypatch):
    """PEFT takes the SVD with torch.svd_lowrank (randomised); with q = min(out, in) that is an exact SVD up to
    signs, so here it is replaced by the exact one splice uses. Then: the same start, the same outputs after the
    same update, and splice's folder (plain LoRA of rank 2r against the untouched base) loads in PEFT."""
    from peft.tuners.lora.loraga import preprocess_loraga

    fam = tiny["llama"]
    data = [fam.batch(rows=3, seed=s) for s in (5, 6)]
    for d in data:
        d["labels"] = d["input_ids"]
    fields = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])

    def exact_svd(A, q=None, niter=None):
        U, S, Vh = torch.linalg.svd(A, full_matrices=False)
        return U, S, Vh.mH

    monkeypatch.setattr(torch, "svd_lowrank", exact_svd)
    reference = fam.build()
    cfg = peft.LoraConfig(init_lora_weights="lora_ga", lora_ga_config=peft.LoraGAConfig(), **fields)

    def train_step():
        for d in data:
            reference(**d).loss.backward()

    preprocess_loraga(reference, cfg, train_step)
    theirs = peft.get_peft_model(reference, cfg).eval()
    ours = splice.adapt(fam.build(), splice.LoraConfig(init_lora_weights="lora_ga", **fields), calibration=data)
    ours.eval()
    base_out = fam.output(fam.build())
    close(fam.output(ours), base_out)
    close(fam.output(theirs), base_out)
    expected = same_start_then_same_step(fam, ours, theirs, n_params=16)
    splice.save_adapter(ours, tmp_path / "ga")
    close(fam.output(peft.PeftModel.from_pretrained(fam.build(), tmp_path / "ga")), expected)


# -- CorDA ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_corda_start_is_the_context_decomposition_of_the_weight(method):
    """U S Vᵀ = W with W C = U S V̂ᵀ and V = (V̂ᵀ C⁻¹)ᵀ (C the damped mean of per-sample normalised XᵀX): the start
    is the top (ipm) or bottom (kpm) r of those triplets, and the adapted layer starts as the base."""
    torch.manual_seed(0)
    model = Probe()
    g = torch.Generator().manual_seed(2)
    data = [{"x": torch.randn(2, 12, 10, generator=g) * torch.linspace(0.2, 3, 10), "t": torch.zeros(2, 12, 8)}
            for _ in range(2)]
    samples = [s / s.max().abs() for d in data for s in d["x"]]
    C = sum(s.t() @ s for s in samples) / len(samples)
    x = torch.randn(5, 10, generator=g)
    base_out = model.proj(x).detach()
    W = model.proj.weight.detach().clone()
    s = 4 / 2
    cfg = splice.LoraConfig(r=2, lora_alpha=4, target_modules=["proj"], init_lora_weights="corda",
                            corda_config={"corda_method": method})
    splice.adapt(model, cfg, calibration=data, calibration_loss=lambda b: model(**b))
    adapter = model.proj.adapters["default"]
    damped = C + torch.eye(10) * C.diagonal().mean() * 0.01  # well conditioned: the first damping suffices
    U, S, Vh = torch.linalg.svd(W @ damped, full_matrices=False)
    V = (Vh @ torch.linalg.inv(damped)).t()
    close(U @ torch.diag(S) @ V.t(), W, atol=1e-4)  # the decomposition reproduces the weight
    part = slice(0, 2) if method == "ipm" else slice(6, 8)  # min(out, in) = 8 triplets
    close(s * adapter.lora_B @ adapter.lora_A, U[:, part] @ torch.diag(S[part]) @ V[:, part].t(), atol=1e-4)
    close(adapter.lora_A.norm(dim=1) ** 2 * s, S[part] * V[:, part].norm(dim=0) ** 2, atol=1e-4)
    assert torch.equal(model.proj.weight, W)
    close(model.proj(x), base_out)


def test_corda_matches_peft(tiny, tmp_path):
    """KPM (the smallest triplets, sensitive to the last bits of the covariance) on the same samples, fed one per
    batch as PEFT's hook requires: the same A and B, the same outputs after the same update, and splice's folder
    (plain LoRA of rank 2r against the untouched base) loads in PEFT."""
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    fam = tiny["llama"]
    batch = fam.batch(rows=3, seed=7)
    fields = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"])
    reference = fam.build()
    cfg = peft.LoraConfig(init_lora_weights="corda", corda_config=CordaConfig(corda_method="kpm"), **fields)

    samples = [{"input_ids": batch["input_ids"][i:i + 1]} for i in range(3)]  # PEFT's hook takes one at a time

    def run_model():
        for sample in samples:
            reference(**sample)

    preprocess_corda(reference, cfg, run_model=run_model)
    theirs = peft.get_peft_model(reference, cfg).eval()
    ours = splice.adapt(fam.build(), splice.LoraConfig(init_lora_weights="corda", corda_config={"corda_method": "kpm"},
                                                       **fields), calibration=samples).eval()
    base_out = fam.output(fam.build())
    close(fam.output(ours), base_out)
    close(fam.output(theirs), base_out)
    # the same outputs after the same update, since both subtract the same start s·B₀A₀
    expected = same_start_then_same_step(fam, ours, theirs, n_params=16)
    splice.save_adapter(ours, tmp_path / "corda")
    close(fam.output(peft.PeftModel.from_pretrained(fam.build(), tmp_path / "corda")), expected)


@pytest.mark.parametrize("init", ["olora", "pissa"])
def test_peft_converted_folder_of_a_start_init_loads_in_splice(tiny, tmp_path, init):
    """PEFT's way to share an adapter whose init moved the base weight: save the initial adapter, train, then save
    with `path_initial_model_for_weight_conversion`, which writes a plain LoRA of rank 2r against the original
    base. splice loads it onto the untouched base with PEFT's outputs."""
    fam = tiny["llama"]
    theirs = peft.get_peft_model(fam.build(), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=init,
                                                              target_modules=["q_proj", "v_proj"])).eval()
    theirs.peft_config["default"].init_lora_weights = True  # PEFT's recipe: the initial folder must not re-init
    theirs.save_pretrained(tmp_path / "initial")
    theirs.peft_config["default"].init_lora_weights = init
    randomise([p for n, p in theirs.named_parameters() if "lora_" in n], seed=4)
    expected = fam.output(theirs)
    theirs.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    assert json.loads((tmp_path / "converted" / "adapter_config.json").read_text())["r"] == 8
    close(fam.output(splice.load_adapter(fam.build(), tmp_path / "converted")), expected)


def test_data_driven_starts_refuse_or_skip_what_they_cannot_use():
    from splice.adapters.inits.calibrate import token_mask
    from splice.adapters.inits.corda import CordaConfig, corda_start

    # A seq2seq batch: decoder labels are another length than the encoder's mask, and say nothing about it.
    batch = {"attention_mask": torch.ones(2, 12, dtype=torch.long), "labels": torch.zeros(2, 5, dtype=torch.long)}
    assert token_mask(batch, use_labels=True).shape == (2, 12)
    with pytest.raises(splice.SpliceError, match="r: rank 4 is larger than the layer \\(32 → 2\\), which corda"):
        corda_start(torch.randn(2, 32), torch.eye(32), 4, 1.0, CordaConfig())
