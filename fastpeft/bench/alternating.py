"""Whole-model steps timed side by side in one process: a training step and an inference forward per model, run in
alternating order so that a shared machine's slow drifts fall on every implementation alike (the cpu and qlora
benchmark families)."""
from __future__ import annotations

import time

import torch


def steps(models: dict, ids: torch.Tensor) -> dict:
    """impl -> {"train": one training step, "infer": one inference forward} on the batch `ids` (labels = ids)."""
    out = {}
    for impl, model in models.items():
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def train(model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            opt.step()

        def infer(model=model):
            with torch.no_grad():
                model(input_ids=ids, use_cache=False)

        out[impl] = {"train": train, "infer": infer}
    return out


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def alternate(fns: dict, reps: int, clock=time.perf_counter, device: torch.device | None = None) -> dict:
    """impl -> the times (ms) of `reps` calls of fns[impl], after one warm-up call each, the impls taking turns (the
    first on even repetitions, the last on odd ones). On `clock`; on a CUDA `device`, between CUDA events recorded
    around each call (the device's time, not the host's launch time)."""
    order = list(fns)
    times = {impl: [] for impl in order}
    for fn in fns.values():
        fn()
    cuda = device is not None and device.type == "cuda"
    for i in range(reps):
        for impl in (order if i % 2 == 0 else order[::-1]):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fns[impl]()
                end.record()
                end.synchronize()
                times[impl].append(start.elapsed_time(end))
                continue
            start = clock()
            fns[impl]()
            times[impl].append((clock() - start) * 1e3)
    return times
