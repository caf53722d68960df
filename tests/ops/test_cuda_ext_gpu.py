"""GPU tier: the CUDA C++ extension's multi_lora_decode (csrc/multi_lora_decode.cu) against float64 (skipped
without CUDA).

    y[m] += ((x[m] @ A_s.T) * scale_s) @ B_s.T     for s = token_slot[m] a valid, non-empty slot

Random inputs (never zeros), ranks {1, 7, 16, 64, 256} plus a rank past one rank chunk (300), an adapter at an
unaligned address (scalar loads), an empty slot, tokens with slot -1 and slot n_slots, duplicate slots, K and N
odd, K past one shared-memory tile, every (activation, adapter) dtype pair. y is in/out: it starts random and
y_after - y_before is compared; rows of skipped tokens must be bit-identical.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

PAIRS = [  # (activation dtype of x and y, adapter dtype of A and B)
    (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
    (torch.float16, torch.float16), (torch.float16, torch.float32),
    (torch.float32, torch.float32),
]
SHAPES = [(64, 1000, 3001), (64, 1001, 777), (1, 4096, 4096), (37, 5003, 1000)]  # M, K, N
RANKS = [1, 7, 16, 64, 256, 300]
TOL = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 1e-5}


@pytest.fixture(autouse=True)
def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


@pytest.fixture(scope="module")
def ext():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from fastpeft.ops import cuda_ext

    return cuda_ext.load()  # a build failure fails the tests: this machine has a device


def _name(pair) -> str:
    return "-".join(str(d).replace("torch.", "") for d in pair)


def _tensor(shape, dtype, *, unaligned=False, scale=1.0):
    """A contiguous random CUDA tensor; `unaligned`: its data starts one element past a 16-byte boundary."""
    numel = 1
    for s in shape:
        numel *= s
    flat = torch.randn(numel + 1, device="cuda", dtype=torch.float32).mul_(scale).to(dtype)
    return (flat[1:] if unaligned else flat[:numel]).view(shape)


def _adapters(K, N, wdtype, ranks=RANKS):
    """One (A, B, scale) per rank, then one unaligned rank-16 adapter, then an empty slot (None)."""
    adapters = [(_tensor((r, K), wdtype, scale=K ** -0.5), _tensor((N, r), wdtype, scale=r ** -0.5),
                 torch.rand(r, device="cuda") + 0.5) for r in ranks]
    adapters.append((_tensor((16, K), wdtype, unaligned=True, scale=K ** -0.5),
                     _tensor((N, 16), wdtype, unaligned=True, scale=0.25), torch.rand(16, device="cuda") + 0.5))
    adapters.append(None)
    return adapters


def _table(adapters):
    ptrs = [[0 if a is None else a[i].data_ptr() for a in adapters] for i in range(3)]
    table = torch.tensor(ptrs, dtype=torch.int64, device="cuda")
    ranks = torch.tensor([0 if a is None else a[0].shape[0] for a in adapters], dtype=torch.int32, device="cuda")
    return table, ranks


def _slots(M, n_slots, generator):
    """Every slot, -1, n_slots (out of range) and duplicates, shuffled; M = 1 takes the rank-256 slot."""
    if M == 1:
        return torch.tensor([RANKS.index(256)], dtype=torch.int32, device="cuda")
    base = torch.cat([torch.arange(n_slots), torch.tensor([-1, n_slots, 2, 2, 4, -1])])
    extra = torch.randint(-1, n_slots + 1, (max(0, M - base.numel()),), generator=generator)
    slots = torch.cat([base, extra])[torch.randperm(max(M, base.numel()), generator=generator)][:M]
    return slots.to(torch.int32).cuda()


def _expected_delta(x, adapters, slots, N):
    """float64 delta of every row (zero for skipped tokens), grouped by slot."""
    delta = torch.zeros(x.shape[0], N, dtype=torch.float64, device="cuda")
    for s in slots.unique().tolist():
        if not 0 <= s < len(adapters) or adapters[s] is None:
            continue
        A, B, scale = (t.double() for t in adapters[s])
        rows = slots == s
        delta[rows] = ((x[rows].double() @ A.T) * scale) @ B.T
    return delta


def _skipped(slots, adapters):
    n = len(adapters)
    return torch.tensor([not (0 <= s < n) or adapters[s] is None for s in slots.tolist()], device="cuda")


def _check(ext, M, K, N, act, wdt, **kwargs):
    gen = torch.Generator().manual_seed(M * 7919 + K * 31 + N)
    adapters = _adapters(K, N, wdt)
    table, ranks = _table(adapters)
    slots = _slots(M, len(adapters), gen)
    x = torch.randn(M, K, device="cuda", dtype=act)
    y = torch.randn(M, N, device="cuda", dtype=act)
    before = y.clone()
    ext.multi_lora_decode(y, x, table, ranks, slots, adapter_dtype=None if wdt == act else wdt, **kwargs)
    torch.cuda.synchronize()
    expected = _expected_delta(x, adapters, slots, N)
    got = y.double() - before.double()
    assert not torch.isnan(y).any()
    skipped = _skipped(slots, adapters)
    assert torch.equal(y[skipped], before[skipped]), "rows of skipped tokens changed"
    err = ((got - expected).norm() / expected.norm()).item()
    assert err < TOL[act], f"relative Frobenius error {err:.3g} >= {TOL[act]} (M={M}, K={K}, N={N}, {act}, {wdt})"


@pytest.mark.parametrize("pair", PAIRS, ids=_name)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}_K{}_N{}".format(*s))
def test_matches_float64(ext, shape, pair):
    _check(ext, *shape, *pair)


@pytest.mark.parametrize("block_n", [1, 37, 256, 1000, 1024])
def test_block_n(ext, block_n):
    _check(ext, 16, 1000, 3001, torch.bfloat16, torch.bfloat16, block_n=block_n)


def test_runs_on_the_current_stream_and_in_a_cuda_graph(ext):
    M, K, N = 8, 1000, 3001
    adapters = _adapters(K, N, torch.float16)
    table, ranks = _table(adapters)
    slots = torch.tensor([0, 1, 2, 3, 4, 5, -1, 6], dtype=torch.int32, device="cuda")
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    y0 = torch.randn(M, N, device="cuda", dtype=torch.float16)
    expected = y0.double() + _expected_delta(x, adapters, slots, N)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        y = y0.clone()
        ext.multi_lora_decode(y, x, table, ranks, slots)
    stream.synchronize()
    assert ((y.double() - expected).norm() / expected.norm()).item() < 1e-2

    y = y0.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ext.multi_lora_decode(y, x, table, ranks, slots)
    y.copy_(y0)
    graph.replay()
    torch.cuda.synchronize()
    assert ((y.double() - expected).norm() / expected.norm()).item() < 1e-2


def test_validation_messages(ext):
    M, K, N = 4, 64, 32
    adapters = _adapters(K, N, torch.bfloat16, ranks=[8])
    table, ranks = _table(adapters)
    slots = torch.zeros(M, dtype=torch.int32, device="cuda")
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    buf = torch.randn(M * (N + K), device="cuda", dtype=torch.bfloat16)  # y and x views that overlap
    f = ext.multi_lora_decode
    cases = [
        (lambda: f(y.cpu(), x, table, ranks, slots), "y must be a CUDA tensor"),
        (lambda: f(y, x.cpu(), table, ranks, slots), "x is on cpu"),
        (lambda: f(y.float(), x, table, ranks, slots), "same dtype"),
        (lambda: f(y.double(), x.double(), table, ranks, slots), "bfloat16, float16 or float32"),
        (lambda: f(y, x, table, ranks, slots, adapter_dtype=torch.float16), "adapter_dtype"),
        (lambda: f(y, x, table.int(), ranks, slots), "table must be int64"),
        (lambda: f(y, x, table[:2], ranks, slots), r"shape \(3, n_slots\)"),
        (lambda: f(y, x, table, ranks[:-1], slots), "ranks must have shape"),
        (lambda: f(y, x, table, ranks.long(), slots), "ranks must be int32"),
        (lambda: f(y, x, table, ranks, slots[:-1]), "token_slot must have shape"),
        (lambda: f(y[:-1], x, table, ranks, slots), "same number of rows"),
        (lambda: f(y.t().contiguous().t(), x, table, ranks, slots), "y must be contiguous"),
        (lambda: f(y, x, table, ranks, slots, block_n=2000), "block_n"),
        (lambda: f(buf[:M * N].view(M, N), buf[M * N - 8:M * N - 8 + M * K].view(M, K), table, ranks, slots),
         "overlap"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()
