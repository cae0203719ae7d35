"""Adapters in, one adapter out: merge LoRA adapters of one base into a LoRA adapter folder (PEFT format).

When the merged update of a module is a weighted sum of the adapters' updates, ``ΔW = Σ_i c_i s_i B_i A_i``
(s_i = α_i / r_i), it is stored exactly by concatenating ranks:

    B = [c_1 s_1 B_1 | c_2 s_2 B_2 | ...]      (out, Σ r_i)
    A = [A_1; A_2; ...]                         (Σ r_i, in)         with lora_alpha = r, so the written scale is 1

The coefficients c_i are read off the merge method itself, per tensor: it is run on one-hot task vectors (c_i is
the i-th output entry) and then checked on random ones. Any method affine in the models passes (task_arithmetic,
linear with normalize, ... with gradients and filters resolved per tensor); others need a rank.

With ``rank=R`` the update is truncated to its best rank-R approximation (SVD): from the concatenated factors via
two thin QRs when the method is a weighted sum (never forming ΔW), else from the dense merged update that the
model executor computes for that tensor (any method: TIES, DARE, SLERP...).

PEFT's ``add_weighted_adapter(..., combination_type="linear")`` instead merges A and B separately,
``A = Σ √(w_i s_i) A_i`` and ``B = Σ √(w_i s_i) B_i``, whose product contains the cross terms ``B_i A_j`` (i ≠ j):
it is not the weighted sum of the updates. Measured (``tests/merge/test_lora_merge.py::
test_peft_linear_is_not_the_weighted_sum``: two random rank-4 adapters of a tiny Llama, weights 0.7 / 0.3, six
modules), the mean relative error ‖ΔW − Σ w_i s_i B_i A_i‖ / ‖Σ w_i s_i B_i A_i‖ is 0.86 for PEFT's "linear",
8.5e-8 for PEFT's "cat" and 8.7e-8 for this concatenation (float32 rounding).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from splice.delta.deltaset import tensor_fingerprint
from splice.delta.forms import LowRank
from splice.errors import SpliceError
from splice.io.checkpoints import atomic_output_dir, write_json
from splice.io.peft_format import (CONFIG_FILE, PREFIX, SPLICE_FILE, WEIGHTS_FILE, module_prefixes, peft_config_dict,
                                   resolve_module, scale_of)
from splice.merge.card import model_card
from splice.merge.config import torch_dtype
from splice.merge.executor import merge_tensor, tensor_generator
from splice.merge.inputs import LoraInput, ModelFolder
from splice.merge.methods.registry import TensorContext
from splice.merge.plan import MergePlan, TensorTask

__all__ = ["LoraMerge", "weighted_sum_coefficients"]


@dataclass
class _Part:
    """One adapter's factors for one module, in PEFT's layout."""

    src: str  # the module name as that adapter writes it
    kind: str  # linear | conv1d | embedding | conv2d
    A: Tensor  # (r, in[, kh, kw]) (lora_embedding_A: (r, num_embeddings))
    B: Tensor  # (out, r[, 1, 1]) (lora_embedding_B: (dim, r))
    scale: float
    dora: bool = False  # a DoRA module: its update is not B·A (merged through its dense update)


def weighted_sum_coefficients(plan: MergePlan, task: TensorTask, seed: int = 0) -> list[float] | None:
    """The c_i with merged(base, θ_i) = base + Σ c_i (θ_i − base) for this tensor, or None if the method is not so.

    The method is probed on 1-D float64 vectors: one-hot task vectors give the c_i, random ones check them. The
    vectors are long and the two runs draw from different generators, so that a random method (DARE's mask) cannot
    pass for a weighted sum by keeping every entry of a short probe, or the same entries twice.
    """
    n = len(task.inputs)
    length = n + 256
    base_pos = [i for i, s in enumerate(task.inputs) if task.base is not None and s == task.base]
    g = torch.Generator().manual_seed(0)
    b = torch.randn(length, generator=g, dtype=torch.float64)

    def run(deltas: list[Tensor], probe: int) -> Tensor:
        ctx = TensorContext(name=task.name, layer=task.layer, num_layers=task.num_layers,
                            generator=tensor_generator(seed, f"{task.name}#probe{probe}"))
        fn, p = plan.method.fn, {**task.params, **task.model_params}
        if plan.method.space == "delta":
            return fn(b, list(deltas), ctx=ctx, **p).to(torch.float64)  # a method may consume its list
        base = b if task.base is not None else None
        return fn(base, [b + d for d in deltas], ctx=ctx, **p).to(torch.float64) - b

    def zero_base(ds: list[Tensor]) -> list[Tensor]:
        return [torch.zeros_like(d) if i in base_pos else d for i, d in enumerate(ds)]

    try:
        coeffs = run(zero_base(list(torch.eye(length, dtype=torch.float64)[:n])), 0)[:n].tolist()
        r = zero_base([torch.randn(length, generator=g, dtype=torch.float64) for _ in range(n)])
        got = run(r, 1)
    except Exception:  # noqa: BLE001 - a method that cannot take the probe is treated as not a weighted sum
        return None
    want = sum(c * d for c, d in zip(coeffs, r))
    if not torch.allclose(got, want, rtol=1e-5, atol=1e-8):  # loose enough for a method that works in float32
        return None
    return [0.0 if i in base_pos else c for i, c in enumerate(coeffs)]


class LoraMerge:
    """Merge the LoRA inputs of `plan` into one LoRA adapter (see the module docstring).

    Args:
        plan: a plan whose every input other than the base is a LoRA adapter of `plan.base`.
        rank: truncate each module's update to this rank (None: exact, for weighted-sum methods only).
        seed: the seed of random methods (as for a model merge).

    Raises:
        SpliceError: an input that is not an adapter of the base, a DoRA / bias / modules_to_save update (not
            low-rank), or a method that is not a weighted sum without `rank`.
    """

    def __init__(self, plan: MergePlan, rank: int | None = None, seed: int = 0) -> None:
        self.plan, self.rank, self.seed = plan, rank, seed
        if plan.config.slices or not isinstance(plan.base, ModelFolder):
            raise SpliceError("out_format lora: needs a models: config with base_model set to the adapters' base")
        self.tasks = {t.name: t for t in plan.tasks}
        adapters = [s.input for t in plan.tasks[:1] for s in t.inputs if s.input is not plan.base]
        for inp in adapters:
            if not isinstance(inp, LoraInput) or inp.base is not plan.base or inp.adapter is None:
                raise SpliceError(f"out_format lora: {inp.where} is not a LoRA adapter of base_model "
                                  f"{plan.base.folder}; every merged model must be one")
            if inp.adapter.config.method not in ("lora", "dora"):
                raise SpliceError(f"out_format lora: {inp.where} is a {inp.adapter.config.method} adapter, not a "
                                  "LoRA; merge it with the default model output")
        self.parts: dict[str, dict[LoraInput, _Part]] = {}  # base weight name → adapter → its factors
        for inp in adapters:
            parts = _parts(inp)
            full = [n for n in inp.deltas if n not in parts]
            dora = [n for n, p in parts.items() if p.dora]
            if full or (dora and rank is None):
                what = (f"updates {full[0]!r} in full (a trained bias or modules_to_save)" if full else
                        f"is a DoRA adapter ({dora[0]!r}); pass a rank (--lora-rank R) to store its merged update "
                        f"by SVD")
                raise SpliceError(f"out_format lora: {inp.where} {what}, which a LoRA cannot hold exactly")
            for weight, part in parts.items():
                self.parts.setdefault(weight, {})[inp] = part
        kinds = {w: {p.kind for p in parts.values()} for w, parts in self.parts.items()}
        mixed = [w for w, k in kinds.items() if len(k) > 1]
        if mixed:
            raise SpliceError(f"out_format lora: the adapters wrap {mixed[0]!r} as different layer kinds "
                              f"({', '.join(sorted(kinds[mixed[0]]))})")
        self.coefficients = {w: None if any(p.dora for p in parts.values())
                             else weighted_sum_coefficients(plan, self.tasks[w], seed)
                             for w, parts in self.parts.items()}
        if rank is None:
            bad = [w for w, c in self.coefficients.items() if c is None]
            if bad:
                raise SpliceError(f"out_format lora: merge_method {plan.method.name!r} is not a weighted sum of the "
                                  f"adapters for tensor {bad[0]!r}, so no exact LoRA exists; pass a rank "
                                  f"(--lora-rank R) to store the merged update truncated by SVD")

    def summary(self) -> str:
        exact = sum(c is not None for c in self.coefficients.values())
        how = "exact rank concatenation" if self.rank is None else f"rank {self.rank} by SVD"
        return (f"lora output: {len(self.parts)} modules, {how}; the method is a weighted sum for {exact} of "
                f"{len(self.parts)}")

    def module(self, weight: str) -> tuple[str, str, Tensor, Tensor]:
        """(module name, kind, A, B) of the merged update of base tensor `weight`, in PEFT's layout."""
        parts = self.parts[weight]
        first = next(iter(parts.values()))
        src, kind = first.src, first.kind
        coeffs = self.coefficients[weight]
        task = self.tasks[weight]
        if coeffs is not None:
            blocks = [(p.A, c * p.scale * p.B) for s, c in zip(task.inputs, coeffs)
                      if (p := parts.get(s.input)) is not None and c != 0]
            if not blocks:  # every adapter weighted 0 here: a rank-1 zero update keeps the module well-formed
                blocks = [(first.A[:1] * 0, first.B[:, :1] * 0)]
            A = torch.cat([a.float() for a, _ in blocks], dim=0)  # (Σr, in[, kh, kw])
            B = torch.cat([b.float() for _, b in blocks], dim=1)  # (out, Σr[, 1, 1])
            if self.rank is not None and self.rank < A.shape[0]:
                A, B = _truncate_factors(A, B, self.rank)
            return src, kind, A, B
        # In float32: rounding the merged weight to a bf16 base's dtype before subtracting would swamp the update.
        dense = merge_tensor(self.plan, task, seed=self.seed, dtype=torch.float32) - self.plan.base.get(weight).float()
        matrix = dense.t() if kind in ("conv1d", "embedding") else dense.reshape(dense.shape[0], -1)  # (out, in)
        B, A = _svd(matrix, self.rank or min(matrix.shape))
        if kind == "conv2d":
            A, B = A.reshape(A.shape[0], *dense.shape[1:]), B[:, :, None, None]
        return src, kind, A, B

    def write(self, out: str | Path, yaml_text: str, *, force: bool = False, progress: bool = True) -> Path:
        """Write the merged adapter at `out` (atomically): PEFT's files, splice's fingerprints, a README."""
        plan = self.plan
        dtype = torch_dtype(plan.config.out_dtype or plan.config.dtype)
        tensors, ranks, kinds, fingerprint = {}, {}, set(), {}
        weights = sorted(self.parts)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(weights), desc="merging adapters", unit="module")
        try:
            for weight in weights:
                src, kind, A, B = self.module(weight)
                a_key, b_key = (("lora_embedding_A", "lora_embedding_B") if kind == "embedding" else
                                ("lora_A.weight", "lora_B.weight"))
                tensors[f"{PREFIX}{src}.{a_key}"] = A.to(dtype or A.dtype).contiguous()
                tensors[f"{PREFIX}{src}.{b_key}"] = B.to(dtype or B.dtype).contiguous()
                ranks[src] = A.shape[0]
                kinds.add(kind)
                fingerprint[f"{src}.weight"] = tensor_fingerprint(plan.base.get(weight))
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        if not tensors:
            raise SpliceError("out_format lora: the adapters update no tensor")
        r = Counter(ranks.values()).most_common(1)[0][0]
        from splice.adapters.registry import make_config

        config = make_config("lora", target_modules=sorted(ranks), r=r, lora_alpha=r)
        peft_cfg = peft_config_dict(config, fan_in_fan_out="conv1d" in kinds, base=str(plan.config.base_model),
                                    r=r, lora_alpha=r)
        peft_cfg["rank_pattern"] = {m: k for m, k in ranks.items() if k != r}
        peft_cfg["alpha_pattern"] = {m: k for m, k in ranks.items() if k != r}  # alpha = rank: scale 1 everywhere
        with atomic_output_dir(out, force=force) as tmp:
            save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
            write_json(tmp / CONFIG_FILE, peft_cfg)
            write_json(tmp / SPLICE_FILE, {"method": "lora", "config": config.to_dict(),
                                           "base": str(plan.config.base_model), "fingerprint": fingerprint,
                                           "merge_method": plan.method.name})
            (tmp / "README.md").write_text(model_card(plan, yaml_text, Path(out).name, kind="lora",
                                                      modules=len(ranks), seed=self.seed),
                                           encoding="utf-8")
        return Path(out)


def _parts(inp: LoraInput) -> dict[str, _Part]:
    """An adapter's LoRA and DoRA modules keyed by the base tensor they update."""
    folder, base = inp.adapter, inp.base.reader
    names = sorted({k.rsplit(".", 1)[0] for k in base.keys()})
    has = lambda m: f"{m}.weight" in base  # noqa: E731
    out = {}
    for src, t in folder.lora.items():
        weight = f"{resolve_module(src, has, names, module_prefixes(), str(folder.path))}.weight"
        if "lora_embedding_A" in t:
            kind, A, B = "embedding", t["lora_embedding_A"], t["lora_embedding_B"]
        else:
            A, B = t["lora_A.weight"], t["lora_B.weight"]
            kind = "conv2d" if A.dim() == 4 else "conv1d" if folder.peft_config.get("fan_in_fan_out") else "linear"
        dora = "lora_magnitude_vector" in t or not isinstance(inp.deltas.get(weight), LowRank)
        out[weight] = _Part(src, kind, A, B, scale_of(folder.module_config(src)), dora)
    return out


def _svd(matrix: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """(B, A) with B @ A the best rank-`rank` approximation of `matrix`, √σ on each side."""
    U, S, Vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    rank = min(rank, S.numel())
    root = S[:rank].sqrt()
    return (U[:, :rank] * root).float(), (root[:, None] * Vh[:rank]).float()


def _truncate_factors(A: Tensor, B: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Best rank-`rank` approximation of B @ A from the factors: QR of each, SVD of the small core."""
    a = A.reshape(A.shape[0], -1).double()  # (k, in)
    b = B.reshape(B.shape[0], -1).double()  # (out, k)
    qb, rb = torch.linalg.qr(b)  # (out, k), (k, k)
    qa, ra = torch.linalg.qr(a.t())  # (in, k), (k, k)
    core_b, core_a = _svd(rb @ ra.t(), rank)  # (k, rank), (rank, k)
    new_b = (qb @ core_b.double()).float()
    new_a = (core_a.double() @ qa.t()).float()
    if A.dim() == 4:
        return new_a.reshape(-1, *A.shape[1:]), new_b[:, :, None, None]
    return new_a, new_b

