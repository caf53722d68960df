"""What gpu-check writes last: the markdown summary (also printed: the run's last output) and the plots (time /
base time per section; tokens/s and step memory of the training step), each skipped without matplotlib."""
from __future__ import annotations

from pathlib import Path

from ..report import plot_ratio_to_base
from .context import STRATEGIES
from .tier import describe

LINEAR = (("lora", "LoRA", ("r", "dropout")), ("dora", "DoRA", ("r",)), ("ia3", "IA3", ("ia3",)),
          ("lora_4bit", "LoRA on an NF4 weight (base: bitsandbytes' 4-bit layer)", ("r",)))
SHORT = {"r": "r", "dropout": "p", "ia3": ""}  # a plot line's label: "r16 p0.05", "out"


def _f(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec) if isinstance(value, (int, float)) else str(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _linear(name: str, title: str, axes: tuple[str, ...], entry: dict) -> list[str]:
    """Ratios to the base op by M: one line per (mode, shape, axes), cells "fused / cublas / peft"."""
    rows = entry.get("rows", [])
    if not rows:
        return []
    impls = [*STRATEGIES, "peft", *(["bf16_lora"] if any(r["impl"] == "bf16_lora" for r in rows) else [])]
    ms = sorted({r["M"] for r in rows})
    lines: dict[tuple, dict] = {}
    for r in rows:
        if r["impl"] in impls:
            key = (r["mode"], r["shape"], *(r.get(a) for a in axes))
            lines.setdefault(key, {}).setdefault(r["M"], {})[r["impl"]] = r.get("vs_base")
    body = [[*map(str, key), *(" / ".join(_f(cells.get(m, {}).get(i)) for i in impls) for m in ms)]
            for key, cells in lines.items()]
    return [f"### {title}: time / base time ({' / '.join(impls)}), by M", "",
            *_table(["mode", "KxN", *axes, *(f"M={m}" for m in ms)], body), ""]


def _multi(entry: dict) -> list[str]:
    body = [[r["mode"], r["shape"], str(r["B"]), str(r["L"]), r["impl"], _f(r.get("ms"), ".4f"), _f(r.get("vs_base")),
             _f(r.get("vs_peer")), r.get("note", "")] for r in entry.get("rows", [])]
    n = entry.get("config", {}).get("adapters")
    return [f"### Multi-LoRA ({n} distinct rank-16 adapters, one per row)", "",
            *_table(["phase", "KxN", "B", "L", "impl", "ms", "x base", "vs peft", "note"], body), ""] if body else []


def _prefix(entry: dict) -> list[str]:
    body = [[r["mode"], str(r["L"]), str(r["P"]), r["impl"], _f(r.get("ms"), ".4f"), _f(r.get("vs_base"), ".3f"),
             _f(r.get("target_ratio"), ".3f"), r.get("note", "")] for r in entry.get("rows", [])]
    return ["### Prefix attention vs SDPA without the prefix (floor)", "",
            *_table(["mode", "L", "P", "impl", "ms", "x floor", "target", "note"], body), ""] if body else []


def _qlora(entry: dict) -> list[str]:
    body = [[r["tokens"], r["mode"], r["impl"], _f(r.get("ms"), ".2f"), _f(r.get("vs_peer"), ".3f"),
             _f(r.get("weights_mib"), ".0f"), _f(r.get("step_peak_mib"), ".0f"), _f(r.get("rel_err"), ".1e"),
             r.get("note", "")] for r in entry.get("rows", [])]
    return ["### QLoRA model step (fastpeft bench qlora): NF4 base vs PEFT's QLoRA and LoRA on the bf16 base", "",
            *_table(["tokens", "mode", "impl", "ms", "peft/x", "weights MiB", "step MiB", "rel_err vs peft", "note"],
                    body), ""] if body else []


def _train(entry: dict) -> list[str]:
    body = [[r["impl"], _f(r.get("ms")), _f(r.get("tokens_per_s"), ".0f"), _f(r.get("step_mib"), ".0f"),
             _f(r.get("vs_base"), ".3f"), _f(r.get("vs_peer")), _f(r.get("loss"), ".4f"), _f(r.get("loss_err"), ".1e"),
             _f(r.get("grad_norm"), ".4g"), _f(r.get("grad_norm_err"), ".1e"), _f(r.get("grad_err"), ".1e"),
             r.get("note", "")] for r in entry.get("rows", [])]
    c, ref = entry.get("config", {}), entry.get("float32_reference", {})
    head = (f"### Training step: Llama hidden {c.get('hidden')}, {c.get('layers')} layers, batch {c.get('batch')} x "
            f"{c.get('seq')}, LoRA r {c.get('r')} on {', '.join(c.get('targets', []))}")
    errs = (f"Errors against PEFT's model in float32 (loss {_f(ref.get('loss'), '.4f')}, |g| "
            f"{_f(ref.get('grad_norm'), '.4g')}); grad err: the largest per-tensor relative error.")
    header = ["impl", "ms", "tokens/s", "step MiB", "x base", "vs peft", "loss", "loss err", "|g|", "|g| err",
              "grad err", "note"]
    return [head, "", errs, "", *_table(header, body), ""] if body else []


def _serve(entry: dict) -> list[str]:
    body = [[str(r["adapters"]), r["impl"], r["mode"], _f(r.get("tokens_per_s"), ".0f"),
             _f(r.get("vs_no_adapters"), ".3f"), _f(r.get("ttft_p50_ms"), ".1f"), _f(r.get("ttft_p99_ms"), ".1f"),
             _f(r.get("token_p50_ms"), ".2f"),
             _f(r.get("token_p99_ms"), ".2f"), f"{r.get('answered', '-')}/{r.get('requests', '-')}", r.get("note", "")]
            for r in entry.get("rows", [])]
    c = entry.get("config", {})
    head = (f"### Serving (fastpeft serve's engine): Llama hidden {c.get('dims', {}).get('hidden')}, "
            f"{c.get('dims', {}).get('layers')} layers, rank-{c.get('rank')} LoRA adapters, {c.get('requests')} "
            f"requests of {c.get('prompt_len')} + {c.get('gen_len')} tokens")
    header = ["adapters", "popularity", "mode", "tokens/s", "x none", "TTFT p50 ms", "TTFT p99 ms", "token p50 ms",
              "token p99 ms", "answered", "note"]
    return [head, "", *_table(header, body), ""] if body else []


def _moe(entry: dict) -> list[str]:
    body = [[r["layer"], f"{r['E']} / {r['H']} / {r['I']} / {r['top_k']}", r["mode"], r["impl"], _f(r.get("ms"), ".3f"),
             _f(r.get("vs_base"), ".3f"), _f(r.get("vs_peer"), ".3f"), _f(r.get("rel_err"), ".1e"), r.get("note", "")]
            for r in entry.get("rows", [])]
    c = entry.get("config", {})
    head = (f"### LoRA on MoE expert tensors (fastpeft bench moe): one experts layer, {c.get('tokens')} tokens, "
            f"rank {c.get('rank')}; rel_err: fastpeft against PEFT")
    header = ["layer", "E / H / I / top-k", "mode", "impl", "ms", "x base", "peft/x", "rel_err", "note"]
    return [head, "", *_table(header, body), ""] if body else []


def _targets(targets: list[dict]) -> list[str]:
    body = []
    for t in targets:
        cells = [f"{name} {_f(v['value'])} ({v.get('points_met', 0)}/{v['points']})"
                 for name, v in t["variants"].items()]
        worst = " ".join(f"{k}={v}" for k, v in (t["variants"]["best"].get("worst") or {}).items()) or "-"
        met = {True: "met", False: "NOT met", None: "n/a"}[t["met"]]
        body.append([t["what"], "; ".join(cells), f"{t['op']} {t['threshold']:g}", met, worst])
    return ["## Targets (recorded, not asserted): worst value (points meeting it / points)", "",
            *_table(["target", "values", "threshold", "best", "worst point (best)"], body), ""]


def _strategies(table: dict) -> list[str]:
    choices = {op: {int(b): c for b, c in per.items()} for op, per in table.get("choices", {}).items()}  # JSON: str
    buckets = sorted({int(b) for per in choices.values() for b in per})
    body = [[op, *(f"{per[b]['choice']} (fused/cublas {per[b]['total_ms']['fused'] / per[b]['total_ms']['cublas']:.2f})"
                   if b in per else "-" for b in buckets)] for op, per in choices.items()]
    written = ", ".join(table.get("written", [])) or f"not written ({table.get('why_not_written', '')})"
    return ["## Strategy table (M up to each bucket)", "", f"Rule: {table.get('rule', '')}.", "",
            *_table(["op", *(f"M<={b}" for b in buckets)], body), "", f"Written: {written}.", ""]


def markdown(p: dict) -> str:
    """The run's summary as markdown (what is printed last)."""
    v, git = p["versions"], p.get("git", {})
    dry = (" (DRY RUN on the CPU: the figures show that everything runs; they are not measurements)"
           if p["dry_run"] else "")
    lines = [f"# gpu-check: {p['device']['name']}{dry}", "",
             f"- {p['date']}; `{p['command']}`; commit {git.get('commit')}{' (dirty)' if git.get('dirty') else ''}",
             f"- torch {v.get('torch')}, triton {v.get('triton')}, transformers {v.get('transformers')}, peft "
             f"{v.get('peft')}, CUDA {v.get('cuda')}; {p['dtype']}",
             f"- wall {p.get('wall_s', 0):.0f} s of {p['budget']['total_s']:.0f} s after the imports; autotune: "
             f"{p['autotune'].get('autotune_bench')}, {p['autotune'].get('configs_tried')}", ""]
    tier = p.get("gpu_tests", {})
    lines += ["## GPU test tier", "", f"{describe(tier) if tier else 'not run'}; autotune {tier.get('autotune')}", ""]
    failed = [f"- FAILED {f['test']}: {f['message']}" for f in tier.get("failures", [])[:12]]
    lines += [*failed, ""] if failed else []
    peaks = p.get("peaks")
    if peaks:
        lines += ["## Ceilings", "", f"device-to-device copy {peaks['bandwidth_gbps']:.1f} GB/s; cuBLAS "
                  f"{peaks['dtype']} GEMM {peaks['matmul_tflops']:.1f} TFLOP/s ({peaks['matmul_n']}^3); ridge "
                  f"{peaks['ridge_flops_per_byte']:.0f} flop/byte", ""]
    status = [[name, str(len(e.get("rows", []))), str(len(e.get("guard", {}).get("skipped", []))),
               str(len(e.get("errors", []))), _f(e.get("guard", {}).get("wall_s"), ".0f"),
               _f(e.get("guard", {}).get("allowed_s"), ".0f")] for name, e in p["sections"].items()]
    lines += ["## Sections", "", *_table(["section", "rows", "cases skipped (time guard)", "errors", "wall s",
                                          "allowed s"], status), ""]
    sections = p["sections"]
    for name, title, axes in LINEAR:
        lines += _linear(name, title, axes, sections.get(name, {}))
    lines += _multi(sections.get("multi_lora", {})) + _prefix(sections.get("prefix_attention", {}))
    lines += _train(sections.get("train_step", {})) + _qlora(sections.get("qlora", {}))
    lines += _serve(sections.get("serve", {}))
    lines += _moe(sections.get("moe", {}))
    lines += _targets(p.get("targets", [])) + _strategies(p.get("strategy_table", {}))
    notes = [f"- {n[:240]}" for n in p["notes"][:12]] + ([f"- ... {len(p['notes']) - 12} more in the JSON"]
                                                         if len(p["notes"]) > 12 else [])
    lines += ["## Notes", "", *(notes or ["none"])]
    return "\n".join(lines) + "\n"


def plots(p: dict, sibling) -> list[Path]:
    """Every section's plot next to the JSON (sibling(suffix) -> path); those drawn."""
    sections, device = p["sections"], p["device"]["name"]
    drawn = []
    for name, title, axes in LINEAR:
        rows = [dict(r, case=" ".join(f"{SHORT[a]}{r.get(a):g}" if SHORT[a] else str(r.get(a)) for a in axes))
                for r in sections.get(name, {}).get("rows", [])]
        if rows:
            drawn.append(plot_ratio_to_base(rows, sibling(f"-{name}.png"), style_key="case",
                                            title=f"{title} vs base linear: {device}, {p['dtype']}"))
    rows = sections.get("multi_lora", {}).get("rows", [])
    if rows:
        drawn.append(plot_ratio_to_base(rows, sibling("-multi_lora.png"), x_key="M",
                                        title=f"Multi-LoRA (64 rank-16 adapters) vs base linear: {device}"))
    rows = sections.get("prefix_attention", {}).get("rows", [])
    if rows:
        drawn.append(plot_ratio_to_base(rows, sibling("-prefix_attention.png"), panel_key="P", x_key="L", base="floor",
                                        title=f"Prefix attention vs SDPA without prefix: {device}"))
    drawn.append(_train_plot(sections.get("train_step", {}).get("rows", []), sibling("-train_step.png"), device))
    drawn.append(_serve_plot(sections.get("serve", {}), sibling("-serve.png"), device, p["dtype"]))
    return [d for d in drawn if d is not None]


def _serve_plot(entry: dict, path: Path, device: str, dtype: str) -> Path | None:
    """fastpeft bench serve's plot of the section's runs (throughput and latency against the number of adapters)."""
    from ..serve import plot

    runs = [{"adapters": r["adapters"], "popularity": "none" if r["impl"] == "base" else r["impl"], "mode": r["mode"],
             "tokens_per_s": r["tokens_per_s"], "ttft_ms": {"p50": r["ttft_p50_ms"], "p99": r["ttft_p99_ms"]},
             "per_token_ms": {"p50": r["token_p50_ms"], "p99": r["token_p99_ms"]}}
            for r in entry.get("rows", []) if r.get("tokens_per_s")]
    rank = entry.get("config", {}).get("rank")
    return plot(runs, path, title=f"Serving: rank-{rank} LoRA adapters vs none: {device}, {dtype}") if runs else None


def _train_plot(rows: list[dict], path: Path, device: str) -> Path | None:
    """Two bar charts: tokens/s and step memory per implementation."""
    rows = [r for r in rows if r.get("tokens_per_s")]
    if not rows:
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:
        print(f"plot skipped: matplotlib is not available ({exc})", flush=True)
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    names = [r["impl"] for r in rows]
    axes[0].bar(names, [r["tokens_per_s"] for r in rows], color=[f"C{i}" for i in range(len(rows))])
    axes[0].set_ylabel("tokens/s")
    axes[1].bar(names, [r.get("step_mib") or 0 for r in rows], color=[f"C{i}" for i in range(len(rows))])
    axes[1].set_ylabel("step memory (MiB)")
    fig.suptitle(f"LoRA training step: {device}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
