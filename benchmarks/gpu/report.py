"""Tables from the GPU suite's ``results.jsonl`` (one JSON object per result, see ``common.record``).

    python benchmarks/gpu/report.py RESULTS.jsonl                 Markdown summary on stdout
    python benchmarks/gpu/report.py RESULTS.jsonl --section FILE  also rewrite FILE's section
                                                                  "CPU twin of the GPU machine" (twin
                                                                  runs) or "GPU suite" (GPU runs)

Standard library only: it runs last, whatever state the stages left the environment in.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

TWIN_HEADING = "## CPU twin of the GPU machine (`bash benchmarks/gpu_suite.sh --twin`)"
GPU_HEADING = "## GPU suite (`bash benchmarks/gpu_suite.sh`)"


def load(path: str) -> list[dict]:
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows


def _table(head: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def _g(x, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def _status(rc: int) -> str:
    return {0: "ok", 124: "TIMED OUT", 137: "KILLED (time limit)"}.get(rc, f"FAILED (rc {rc})")


def render(rows: list[dict]) -> str:
    by = {}
    for r in rows:
        by.setdefault(r["kind"], []).append(r)
    parts = []

    envs = by.get("env", [])
    if envs:
        e = envs[-1]
        keys = [
            "device",
            "capability",
            "sms",
            "memory_gib",
            "driver",
            "torch",
            "torch_cuda",
            "triton",
            "cudnn",
            "python",
            "numpy",
            "nvcc",
            "compute_sanitizer",
            "cpu",
            "cpus",
            "git",
        ]
        parts.append("**Machine and software**\n\n" + _table(["", ""], [[k, e[k]] for k in keys if k in e]))

    for t in by.get("twin", []):
        parts.append(f"**{t['what']}**: {t['value']}\n")

    stages = by.get("stage", [])
    if stages:
        total = sum(s["seconds"] for s in stages)
        parts.append(
            f"**Stages** ({total} s in all)\n\n"
            + _table(
                ["stage", "limit (s)", "took (s)", "status"],
                [
                    [
                        s["name"],
                        s["limit"],
                        s["seconds"],
                        _status(s["rc"]) + (f": `{s['last'][:160]}`" if s["rc"] else ""),
                    ]
                    for s in stages
                ],
            )
        )

    for p in by.get("pytest", []):
        parts.append(f"**{p['what']}**: {p['summary']}\n")

    checks = by.get("check", [])
    if checks:
        lines = []
        for c in checks:
            errs = ", ".join(f"{k[4:]} {v:.2e}" for k, v in c.items() if k.startswith("err_"))
            verdict = "ok" if c["ok"] else "**FAIL**"
            lines.append([c["path"], c["dtype"], c["shape"], errs, f"{c['bound']:.0e}", verdict])
        parts.append(
            "**Correctness** (||fast - ref|| / ||ref||, reference in float64)\n\n"
            + _table(["path", "dtype", "shape", "errors", "bound", ""], lines)
        )

    for m in by.get("memcheck", []):
        parts.append(f"**compute-sanitizer memcheck**: {m['summary']}\n")

    sweeps = by.get("sweep", [])
    if sweeps:
        lines = [
            [s["kernel"], s["key"], s["config"], s["role"], _g(s.get("ms"), ".4f"), _g(s.get("err"), ".1e")]
            for s in sweeps
        ]
        parts.append(
            "**Tile sweep** (seed shape, bf16; config = tiles, warps, stages; median ms)\n\n"
            + _table(["kernel", "key", "config", "role", "ms", "err vs heuristic"], lines)
        )
    winners = by.get("winner", [])
    if winners:
        lines = [
            [
                w["kernel"],
                w["key"],
                w["config"],
                _g(w["ms"], ".4f"),
                w["heuristic"],
                _g(w["heuristic_ms"], ".4f"),
                f"{w['speedup']:.2f}x",
            ]
            for w in winners
        ]
        parts.append(
            "**Winners** (written to the winners file)\n\n"
            + _table(["kernel", "key", "winner", "ms", "heuristic", "ms", "speed-up"], lines)
        )

    ops = by.get("op", [])
    if ops:
        lines = []
        for o in ops:
            if "error" in o:
                lines.append([o["op"], o["pass_"], o["impl"], "-", "-", "-", o["error"][:80]])
            else:
                lines.append(
                    [
                        o["op"],
                        o["pass_"],
                        o["impl"],
                        _g(o["ms"], ".4f"),
                        _g(o["tflops"], ".1f"),
                        _g(o["gbs"], ".0f"),
                        o.get("tuning") or "",
                    ]
                )
        parts.append(
            "**Per-op speed** (seed shape, bf16, do_bench median; TFLOP/s and GB/s from the kernels' "
            "cost models)\n\n" + _table(["op", "pass", "implementation", "ms", "TFLOP/s", "GB/s", "note"], lines)
        )

    train = by.get("train", [])
    if train:
        lines = [
            [
                t["variant"],
                t["mode"],
                _g(t["ms_per_step"], ".2f"),
                _g(t["cells_per_s"], ".0f"),
                _g(t["peak_mib"], ".0f"),
                _g(t["warmup_s"], ".1f"),
            ]
            for t in train
        ]
        parts.append(
            "**Training step** (seed config, B=256, 2000 genes, bf16 autocast, AdamW + EMA + clipping)\n\n"
            + _table(["model", "mode", "ms/step", "cells/s", "peak MiB", "warm-up s"], lines)
        )
        impl = train[0].get("implementations")
        if impl:
            parts.append(f"Implementations that ran (first case): `{impl}`\n")

    samples = by.get("sample", [])
    if samples:
        lines = [
            [
                s["variant"],
                s["sampler"],
                s["cells"],
                s["batch"],
                _g(s["seconds"], ".2f"),
                _g(s["cells_per_s"], ".0f"),
                _g(s["model_calls_per_cell"], ".1f"),
                _g(s["peak_mib"], ".0f"),
                _g(s["warmup_s"], ".1f"),
                s["finite"],
            ]
            for s in samples
        ]
        header = ["model", "settings", "cells", "batch", "s", "cells/s", "model calls/cell", "peak MiB", "warm-up s"]
        parts.append(
            "**Sampling** (`wbdit.sample`'s defaults and the old recipe, seed config, fp32)\n\n"
            + _table([*header, "finite"], lines)
        )

    skips = by.get("skip", [])
    if skips:
        parts.append(
            "**Skipped** (what each stage would do with a GPU)\n\n"
            + "".join(f"- {s['stage']}: {s['what']} ({s['why']})\n" for s in skips)
        )
    errors = by.get("error", [])
    if errors:
        parts.append(
            "**Errors**\n\n"
            + "".join(f"- {e['stage']}: {e['what']}: `{e['error'].strip().splitlines()[-1]}`\n" for e in errors)
        )
    return "\n".join(parts)


def update_section(path: str, heading: str, body: str) -> None:
    """Replace (or append) the section under ``heading`` of the Markdown file, leaving the rest alone."""
    text = open(path).read() if os.path.exists(path) else "# Results\n"
    section = f"{heading}\n\n{body.rstrip()}\n"
    start = text.find(heading)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + section + ("" if end < 0 else text[end:])
    with open(path, "w") as f:
        f.write(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results")
    parser.add_argument("--section", help="Markdown file whose twin / GPU section to rewrite")
    parser.add_argument("--intro", default="", help="text placed before the tables in that section")
    args = parser.parse_args(argv)
    rows = load(args.results)
    body = render(rows)
    sys.stdout.write(body)
    if args.section:
        twin = any(r["kind"] == "twin" for r in rows)
        update_section(args.section, TWIN_HEADING if twin else GPU_HEADING, (args.intro + "\n\n" + body).strip())


if __name__ == "__main__":
    main()
