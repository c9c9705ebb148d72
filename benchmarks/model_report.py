"""The report of the launch/traffic model (benchmarks/launch_model.py): per-kernel launches and
bytes, passes, the roofline ratio to the base per device, and the strategy the model picks.

    python benchmarks/gpu_suite.py --model      # prints it, writes benchmarks/results/gpu-model.md
"""

from __future__ import annotations

import os
import sys

from launch_model import (
    BW_EFF,
    DEVICES,
    GEMM_EFF,
    LAUNCH_US,
    TRITON_GEMM_REL,
    ModelShape,
    count,
    rows,
    summarize,
)


def model_report(d_values=(4096, 7168), n: int = 8192) -> str:
    """The markdown report of issue 13's shapes (bf16, T=8, R=16, deterministic off)."""
    out = ["| device | peak bf16 dense | bandwidth |\n|---|---|---|"]
    out += [
        f"| {k} | {p / 1e12:.0f} TFLOP/s | {b / 1e12:.3f} TB/s |" for k, (p, b) in DEVICES.items()
    ]
    out.append(f"\nAssumed: GEMM_EFF {GEMM_EFF} of peak FLOP/s, BW_EFF {BW_EFF} of peak ")
    out[-1] += f"bandwidth, {LAUNCH_US} us per launch; a Triton GEMM at {TRITON_GEMM_REL} of "
    out[-1] += "cuBLAS's efficiency (the fused strategy's base GEMM).\n"
    verdict = []
    for d in d_values:
        base_shape = ModelShape(n=n, d=d)
        base = summarize(count(base_shape, base_only=True), base_shape)
        for routing in ("hard", "soft"):
            for strategy in ("addmm", "fused"):
                shape = ModelShape(n=n, d=d, routing=routing, strategy=strategy)
                recs = count(shape)
                s = summarize(recs, shape)
                out.append(f"### {routing} routing, strategy {strategy}: N={n}, D_in=D_out={d}, ")
                out[-1] += f"T={shape.t}, R={shape.r}, bf16, bias, top_k 0\n"
                out.append(
                    "| launch | count | read MB | write MB | exposed |\n|---|---|---|---|---|"
                )
                for name, c, rd, wr, ex in rows(recs):
                    out.append(f"| {name} | {c} | {rd:.1f} | {wr:.1f} | {'yes' if ex else 'no'} |")
                tot = [
                    f"{s[k]:.2f} {k.split('_')[0]} passes (base {base[k]:.2f})"
                    for k in ("total_passes", "exposed_passes")
                ]
                out.append(f"\n**{s['launches']} launches (base {base['launches']}), ")
                out[-1] += ", ".join(tot) + "**\n"
                out.append("| | " + " | ".join(DEVICES) + " |\n|---|" + "---|" * len(DEVICES))
                for label, vals in (
                    ("op ms", [s["times"][k] * 1e3 for k in DEVICES]),
                    ("base ms", [base["times"][k] * 1e3 for k in DEVICES]),
                    ("op / base", [s["times"][k] / base["times"][k] for k in DEVICES]),
                ):
                    out.append(f"| {label} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
                out[-1] += "\n"
                verdict.append((d, routing, strategy, s, base))
    return "\n".join(out + strategy_table(verdict))


def strategy_table(verdict: list) -> list[str]:
    """Per (D, routing, device): both ratios, the faster strategy, and the Triton GEMM efficiency
    (vs cuBLAS) the fused strategy would need to break even with addmm."""
    out = ["### Strategy from the model (triton_ops.STRATEGY_TABLE)\n"]
    out.append("| D | routing | device | addmm / base | fused / base | model picks | fused needs |")
    out.append("|---|---|---|---|---|---|---|")
    by = {(d, r, st): (s, b) for d, r, st, s, b in verdict}
    for d, routing in sorted({(d, r) for d, r, _, _, _ in verdict}):
        (sa, base), (sf, _) = by[(d, routing, "addmm")], by[(d, routing, "fused")]
        for k in DEVICES:
            ra, rf = sa["times"][k] / base["times"][k], sf["times"][k] / base["times"][k]
            gemm = sf["gemm_s"][k]
            other = sf["times"][k] - gemm / TRITON_GEMM_REL[k]
            need = gemm / (sa["times"][k] - other) if sa["times"][k] > other else float("inf")
            pick = "addmm" if ra <= rf else "fused"
            row = f"| {d} | {routing} | {k} | {ra:.3f} | {rf:.3f} | {pick} | >= {need:.2f} |"
            out.append(row)
    return out


def device_key(card: str) -> str | None:
    """The modelled device a torch device name ("NVIDIA H200", "NVIDIA A100-SXM4-80GB") is."""
    for tag, key in (("H200", "H200"), ("H100", "H100-SXM"), ("A100", "A100-SXM 80GB")):
        if tag in card:
            return key
    return None


def predicted_ratio(card: str, n: int, d_in: int, d_out: int, t: int, r: int, routing: str,
                    strategy: str) -> float | None:  # fmt: skip
    """The model's fwd+bwd / base for one measured shape, or None (a card or a non-square layer
    the model does not cover). Counts on meta tensors: call without TRITON_INTERPRET."""
    key = device_key(card)
    if key is None or d_in != d_out or os.environ.get("TRITON_INTERPRET") == "1":
        return None
    shape = ModelShape(n=n, d=d_in, t=t, r=r, routing=routing, strategy=strategy)
    base_shape = ModelShape(n=n, d=d_in, t=t, r=r)
    op = summarize(count(shape), shape)["times"][key]
    return op / summarize(count(base_shape, base_only=True), base_shape)["times"][key]


def predicted_cell(card: str, shape, routing: str, provider: str) -> str:
    """predicted_ratio for a gpu_suite Shape and provider ("mftk-addmm"), as a table cell."""
    try:
        r = predicted_ratio(card, shape.n, shape.d_in, shape.d_out, shape.tasks, shape.rank,
                            routing, provider.split("-")[1])  # fmt: skip
    except Exception as e:  # the model must not cost the measured table
        return f"model failed: {type(e).__name__}"
    return "-" if r is None else f"{r:.3f}"


def main(out_path: str | None = None, commit: str = "unknown") -> int:
    """Print the model and write it to out_path (benchmarks/results/gpu-model.md)."""
    if os.environ.pop("TRITON_INTERPRET", "0") == "1" and "triton" in sys.modules:
        sys.exit("launch_model: triton was imported under TRITON_INTERPRET=1")
    head = "# mftk launch / traffic model: a MODEL's figures, not measurements\n\n"
    head += f"commit {commit}; `python benchmarks/gpu_suite.py --model`; how it counts and the "
    head += (
        "assumptions: benchmarks/launch_model.py. exposed = traffic not hidden by a base GEMM.\n"
    )
    text = head + "\n" + model_report() + "\n"
    print(text)
    if out_path:
        os.makedirs(os.path.dirname(out_path), exist_ok=True)
        with open(out_path, "w") as fh:
            fh.write(text)
        print(f"wrote {out_path}")
    return 0
