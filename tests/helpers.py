"""Random varlen inputs and comparison helpers shared by the tests."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from moba_dist.reference import masked_attention, moba_selection_reference


def make_cu(lengths) -> torch.Tensor:
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32)


@st.composite
def sharded_streams(draw, max_len: int):
    """A packed stream of 1-4 sequences (lengths 0..max_len, at least one token) cut into 1-4
    contiguous slices, some possibly empty: ``(lengths, offsets [W + 1] int64, world)``."""
    lengths = draw(st.lists(st.integers(0, max_len), min_size=1, max_size=4))
    if sum(lengths) == 0:
        lengths[0] = 1
    total = sum(lengths)
    world = draw(st.integers(1, 4))
    cuts = sorted(draw(st.lists(st.integers(0, total), min_size=world - 1, max_size=world - 1)))
    return lengths, torch.tensor([0, *cuts, total]), world


def rand_qkv(total, hq, hkv, d, dtype=torch.float64, gen=None, device="cpu"):
    mk = lambda h: torch.randn(total, h, d, dtype=dtype, generator=gen).to(device)  # noqa: E731
    return mk(hq), mk(hkv), mk(hkv)


def gate_margin(q, k, cu, chunk, topk) -> float:
    """Smallest float64 gap between the last selected and the first unselected past block over all
    queries and heads (inf when no choice is made). Large margins make float32 gating unambiguous."""
    best = float("inf")
    if topk < 2:
        return best
    bounds = cu.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e - s <= chunk:
            continue
        qs, ks = q[s:e].double(), k[s:e].double()
        nb = -(-(e - s) // chunk)
        means = torch.stack([ks[j * chunk:(j + 1) * chunk].mean(0) for j in range(nb)])
        means = means.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        gate = torch.einsum("ihd,jhd->hij", qs, means)
        for i in range(e - s):
            b = i // chunk
            if b < topk:  # fewer past blocks than slots: everything is selected
                continue
            top = gate[:, i, :b].sort(dim=-1, descending=True).values
            best = min(best, float((top[:, topk - 2] - top[:, topk - 1]).min()))
    return best


def assert_close(actual, expected, dtype, what=""):
    if dtype == torch.float64:
        err = (actual - expected).abs().max().item() if actual.numel() else 0.0
        assert err <= 1e-10, f"{what}: max abs error {err}"
    else:
        scale = max(1.0, expected.abs().max().item() if expected.numel() else 0.0)
        err = (actual - expected).abs().max().item() if actual.numel() else 0.0
        assert err <= 1e-5 * scale, f"{what}: max abs error {err} (scale {scale})"


def segment_attention_reference(q, k, v, lq, lk, scale, causal):
    """float64 per-segment dense attention ``out [Tq, Hq, D]`` and ``lse [Hq, Tq]``."""
    outs, lses = [], []
    qa = ka = 0
    rep = q.shape[1] // k.shape[1]
    for a, b in zip(lq, lk):
        mask = torch.ones(a, b, dtype=torch.bool, device=q.device)
        if causal:
            mask = (torch.arange(b, device=q.device)[None, :]
                    <= torch.arange(a, device=q.device)[:, None] + (b - a))
        qs, ks, vs = q[qa:qa + a], k[ka:ka + b], v[ka:ka + b]
        outs.append(masked_attention(qs, ks, vs, mask[None], scale))
        sc = torch.einsum("ihd,jhd->hij", qs, ks.repeat_interleave(rep, 1)) * scale
        lses.append(torch.logsumexp(sc.masked_fill(~mask[None], float("-inf")), -1))
        qa, ka = qa + a, ka + b
    return torch.cat(outs), torch.cat(lses, dim=1)


__all__ = ["make_cu", "rand_qkv", "gate_margin", "assert_close", "moba_selection_reference",
           "segment_attention_reference"]


def moba_case(lengths, chunk, topk, hq, hkv, d=8):
    """float64 inputs of one packed case and the dense reference's output and gradients:
    ``(cu, q, k, v, go, ref, [dq, dk, dv])``, seeded by the case."""
    from moba_dist.reference import moba_attn_varlen_reference

    cu = make_cu(lengths)
    total = int(cu[-1])
    g = torch.Generator().manual_seed(total * 7 + chunk)
    q, k, v, go = (torch.randn(total, h, d, generator=g, dtype=torch.float64) for h in (hq, hkv, hkv, hq))
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = moba_attn_varlen_reference(*full, cu, chunk, topk)
    ref.backward(go)
    return cu, q, k, v, go, ref, [t.grad for t in full]
