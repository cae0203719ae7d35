#!/usr/bin/env python
"""Why splice's mixed batches add LoRA groups one at a time on CPU: the loop against three batched paths.

    python bench/serve_grouping.py            # about a minute, 1 torch thread

One adapted projection of SmolLM2-135M's size (576 → 576, the q_proj/v_proj that bench/serve.py adapts), one
decoding step: 32 rows of one token each, sorted by adapter into G groups (8, 16 and 28: 28 is what a 32-row step
held in bench/serve.py's 512-adapter stream), LoRA ranks drawn from {8, 16, 32, 64}. Timed per forward (the base
GEMM included), interleaved:

- splice: the real path, `splice.mixed_batch` over a LoRA-adapted `nn.Linear`, per group one GEMM and one addmm
  into that group's slice of the output (`LoraAdapter.add_into`);
- rank-bucketed bmm, stacked per step: per distinct rank, one torch.stack of every row's own A and B straight from
  the adapters, two bmm and an index_add: 4 buckets instead of G groups, but the stacks copy rows · r · (in + out)
  numbers each step;
- rank-bucketed bmm from stacks kept between steps (index_select instead of stack): what a cache of stacked factors
  would save, at the price of a second copy of every adapter to keep in sync with its weights;
- one block GEMM: concatenate the G factors (per step), one GEMM for every row against every group's A, zero the
  blocks of other groups, one addmm with the concatenated B;
- one adapter, fused: the same layer with a single adapter for all 32 rows (the floor a mixed batch cannot beat).

All but the last produce the same output (checked to 1e-5 before timing). Writes the "Serving: grouping LoRA rows
on CPU" section of bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import contextlib
import random
import shlex
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

DIM, ROWS, RANKS = 576, 32, (8, 16, 32, 64)


class Proj(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(DIM, DIM, bias=False)

    def forward(self, x):
        return self.proj(x)


def build(groups: int, seed: int = 0):
    import splice

    rng = random.Random(seed)
    torch.manual_seed(seed)
    model = Proj().eval()
    ranks = [rng.choice(RANKS) for _ in range(groups)]
    for g, r in enumerate(ranks):
        splice.adapt(model, splice.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"]), f"a{g}")
    layer = model.proj
    with torch.no_grad():
        for p in splice.trainable_parameters(model):
            p.normal_(0, 0.02)
    A = [layer.adapters[f"a{g}"].lora_A.detach() * layer.adapters[f"a{g}"].scale for g in range(groups)]
    B = [layer.adapters[f"a{g}"].lora_B.detach() for g in range(groups)]
    rows_of = sorted(g % groups for g in range(ROWS))  # every group gets rows; sorted, so groups are slices
    return model, ranks, A, B, rows_of


def runners(groups: int, stack: contextlib.ExitStack) -> tuple[dict, dict[str, float]]:
    import splice

    model, ranks, A, B, rows_of = build(groups)
    x = torch.randn(ROWS, 1, DIM)
    W = model.proj.base.weight.detach()
    # A server enters mixed_batch once per step for all its layers, so its setup is not part of a layer's cost.
    stack.enter_context(splice.mixed_batch(model, [f"a{g}" for g in rows_of]))

    def splice_mixed():
        with torch.no_grad():
            return model(x)

    buckets: dict[int, list[int]] = {}
    for g, r in enumerate(ranks):
        buckets.setdefault(r, []).append(g)
    stacks = {r: (torch.stack([A[g] for g in gs]), torch.stack([B[g] for g in gs])) for r, gs in buckets.items()}
    bucket_rows = {r: [i for i in range(ROWS) if rows_of[i] in gs] for r, gs in buckets.items()}
    index = {r: (torch.tensor(rows), torch.tensor([buckets[r].index(rows_of[i]) for i in rows]))
             for r, rows in bucket_rows.items()}

    def kept_stacks():
        out = x @ W.t()
        for r, (rows, which) in index.items():
            a, b = stacks[r][0].index_select(0, which), stacks[r][1].index_select(0, which)
            out.index_add_(0, rows, torch.bmm(torch.bmm(x.index_select(0, rows), a.transpose(1, 2)),
                                              b.transpose(1, 2)))
        return out

    # Per step, no copy kept: per bucket, one torch.stack of the rows' own factors straight from the adapters.
    per_row = {r: [rows_of[i] for i in rows] for r, rows in bucket_rows.items()}
    scales = [model.proj.adapters[f"a{g}"].scale for g in range(groups)]
    raw_A = [model.proj.adapters[f"a{g}"].lora_A for g in range(groups)]

    def stacked_per_step():
        out = x @ W.t()
        for r, (rows, _) in index.items():
            gs = per_row[r]
            h = torch.bmm(x.index_select(0, rows), torch.stack([raw_A[g] for g in gs]).transpose(1, 2))
            h.mul_(torch.tensor([scales[g] for g in gs]).view(-1, 1, 1))
            out.index_add_(0, rows, torch.bmm(h, torch.stack([B[g] for g in gs]).transpose(1, 2)))
        return out

    offsets = [0]
    for r in ranks:
        offsets.append(offsets[-1] + r)
    mask = torch.zeros(ROWS, offsets[-1])
    for i, g in enumerate(rows_of):
        mask[i, offsets[g]:offsets[g + 1]] = 1

    def block():
        a, b = torch.cat(A), torch.cat(B, dim=1)
        flat = x.view(ROWS, DIM)
        h = (flat @ a.t()).mul_(mask)
        return torch.addmm(flat @ W.t(), h, b.t()).view(ROWS, 1, DIM)

    single, *_ = build(1)

    def one_adapter():
        with torch.no_grad():
            return single(x)

    run = {"splice (one group at a time)": splice_mixed, "rank-bucketed bmm, stacked per step": stacked_per_step,
           "rank-bucketed bmm, stacks kept between steps": kept_stacks, "one block GEMM": block,
           "one adapter, fused": one_adapter}
    reference = splice_mixed()
    for name, f in run.items():
        if name != "one adapter, fused":
            torch.testing.assert_close(f(), reference, atol=1e-5, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
    per_row_mb = sum(ranks[g] for g in rows_of) * 2 * DIM * 4 / 2 ** 20  # every row's A and B, fp32
    per_group_mb = sum(ranks) * 2 * DIM * 4 / 2 ** 20
    copied = {"rank-bucketed bmm, stacked per step": per_row_mb, "rank-bucketed bmm, stacks kept between steps":
              per_row_mb, "one block GEMM": per_group_mb}
    return run, copied


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=200, help="forwards per configuration per round")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = common.machine_info(args.threads)
    t_start = time.perf_counter()
    rows, beaten = [], []
    for groups in (8, 16, 28):
        stack = contextlib.ExitStack()
        run, copied = runners(groups, stack)
        times: dict[str, list[float]] = {k: [] for k in run}
        for _ in range(args.rounds):
            order = list(run)
            random.shuffle(order)  # noise hits every configuration alike
            for name in order:
                t = time.perf_counter()
                for _ in range(args.calls):
                    run[name]()
                times[name].append((time.perf_counter() - t) / args.calls)
        anchor = times["splice (one group at a time)"]
        for name, ts in times.items():
            ratios = [t / a for t, a in zip(ts, anchor)]
            rows.append([groups, name, f"{copied[name]:.1f}" if name in copied else "–",
                         f"{statistics.median(ts) * 1e6:.0f}",
                         f"{statistics.median(ratios):.2f}× ({min(ratios):.2f}–{max(ratios):.2f})"])
            if name.startswith(("rank-bucketed", "one block")) and max(ratios) < 1:
                beaten.append(f"{name} at G={groups}")
        stack.close()
        print(f"groups={groups} done", file=sys.stderr)
    cmd = "python bench/serve_grouping.py" + (" " + shlex.join(argv if argv is not None else sys.argv[1:])).rstrip()
    body = "\n".join([
        common.md_table(["what", "value"], list(info.items())),
        "",
        f"Reproduce: `{cmd}` ({(time.perf_counter() - t_start) / 60:.1f} min). One 576 → 576 projection, one decoding "
        f"step of {ROWS} one-token rows in G adapter groups, ranks from {{{', '.join(map(str, RANKS))}}}; µs per forward (base GEMM "
        f"included), median of {args.rounds} interleaved rounds of {args.calls} calls; ratio to splice's path "
        "per round (median, range).",
        "",
        common.md_table(["groups G", "path", "factors copied per forward MiB", "µs per forward", "× splice"],
                        rows),
        "",
        "The batched paths replace G small GEMMs by a few larger ones but must first copy the factors (per row for "
        "the gathers, per step for the concatenation); the copy grows with the rows' ranks, not "
        "with G, so at few groups of high rank it costs more than the calls it saves. "
        + (f"Faster than splice's loop in every round of this run: {'; '.join(beaten)}." if beaten else
           "None was faster than splice's loop in every round of this run.")
        + " A GPU does the per-group products in one segmented kernel instead (S-LoRA, Punica).",
    ])
    common.write_section(args.out, "## Serving: grouping LoRA rows on CPU (bench/serve_grouping.py)", body)
    print(body)


if __name__ == "__main__":
    main()
