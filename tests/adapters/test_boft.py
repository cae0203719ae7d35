"""BOFT's defining property: R = M_{m−1} ⋯ M₀ is orthogonal, and its butterfly reaches exactly as far as it should —
one factor is block-diagonal in blocks of b (OFT), m factors in blocks of b·2^{m−1} and no narrower. The contract
matrix (test_contract.py) and PEFT parity (test_peft_parity.py) cover everything else.

Tolerance (fp32): 1e-5 absolute on R Rᵀ − I; exact zeros outside the blocks R may touch.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from splice.adapters import make_config
from splice.adapters.registry import get_method


def rotation(fields: dict, in_features: int = 64) -> tuple[torch.Tensor, int]:
    """R (dense) of a BOFT adapter on an nn.Linear with random skew parameters, and its block size b."""
    base = nn.Linear(in_features, 16)
    adapter = get_method("boft").adapter(base, "linear", make_config("boft", target_modules=["x"], **fields))
    with torch.no_grad():
        adapter.boft_R.copy_(torch.randn(adapter.boft_R.shape, generator=torch.Generator().manual_seed(0)))
        return adapter.rotation(), adapter.b


def outside_blocks(R: torch.Tensor, size: int) -> torch.Tensor:
    """The entries of R outside its diagonal blocks of `size`."""
    blocks = torch.arange(R.shape[0]) // size
    return R[blocks[:, None] != blocks[None, :]]


@pytest.mark.parametrize("fields", [dict(boft_block_size=4), dict(boft_block_size=4, boft_n_butterfly_factor=2),
                                    dict(boft_block_size=0, boft_block_num=8, boft_n_butterfly_factor=4),
                                    dict(boft_block_size=2, boft_n_butterfly_factor=6)],
                         ids=["b4-m1", "b4-m2", "D8-m4", "b2-m6"])
def test_rotation_is_orthogonal_and_as_wide_as_its_butterfly(fields):
    R, b = rotation(fields)
    eye = torch.eye(R.shape[0])
    torch.testing.assert_close(R @ R.T, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(R.T @ R, eye, atol=1e-5, rtol=0)
    m = fields.get("boft_n_butterfly_factor", 1)
    span = b * 2 ** (m - 1)
    assert torch.equal(outside_blocks(R, span), torch.zeros_like(outside_blocks(R, span)))
    if m == 1:  # one factor: OFT's block-diagonal R, with the exact Cayley blocks
        assert (R - eye).abs().max() > 1e-2
    else:  # each further factor doubles the span: nothing narrower holds R
        assert outside_blocks(R, span // 2).abs().max() > 1e-2



@pytest.mark.parametrize("method,fields", [("oft", dict(oft_block_size=4, use_cayley_neumann=False)),
                                           ("boft", dict(boft_block_size=4, boft_n_butterfly_factor=2))])
def test_exact_cayley_runs_on_half_precision_weights(method, fields):
    """torch has no half-precision LU on CPU: the exact Cayley solve runs in float32 and returns the weights' dtype
    (bf16 tolerance: 3e-2 on O(1) outputs)."""
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    half_base = copy.deepcopy(base).to(torch.bfloat16)
    config = make_config(method, target_modules=["x"], init_weights=False, **fields)
    full = get_method(method).adapter(base, "linear", config)
    half = get_method(method).adapter(half_base, "linear", config).to(torch.bfloat16)
    half.load_state_dict({k: v.to(torch.bfloat16) for k, v in full.state_dict().items()})
    x = torch.randn(3, 16)
    with torch.no_grad():
        want = full.contribution(x, base(x), base)
        got = half.contribution(x.to(torch.bfloat16), half_base(x.to(torch.bfloat16)), half_base)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=1e-2, rtol=0)
