"""Markdown for one benchmark result (the JSON that run_bench.py writes)."""

from __future__ import annotations

from typing import Any

from bench_servers import LABELS

SELF = "mlx_router"


def fs(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def fr(rate: float | None) -> str:
    return "–" if rate is None else f"{rate:,.0f}" if rate >= 100 else f"{rate:.1f}"


def fx(ratio: float | None) -> str:
    return "–" if ratio is None else f"{ratio:.2f}×"


def div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def _raw_batch(raw: dict[str, Any], length: int, conc: int) -> dict[str, Any] | None:
    return next((b for b in raw.get("batch", []) if b["prompt_tokens"] == length and b["batch"] == conc), None)


def _level(server: dict[str, Any], length: int, conc: int) -> dict[str, Any] | None:
    return next(
        (lv for lv in server.get("levels", []) if lv["prompt_tokens"] == length and lv["concurrency"] == conc), None
    )


def _header(meta: dict[str, Any]) -> list[str]:
    hw, m = meta["hardware"], meta["model"]
    gpu = f"GPU: {hw['gpu']}" if hw.get("gpu") else "GPU: none"
    shape = (
        f"hidden {m['hidden_size']}, {m['num_hidden_layers']} layers, {m['num_attention_heads']} heads "
        f"({m['num_key_value_heads']} kv), intermediate {m['intermediate_size']}, vocab {m['vocab_size']}"
    )
    quant = (
        f", {m['quantization']['bits']}-bit (group {m['quantization']['group_size']})" if m.get("quantization") else ""
    )
    plan = meta["plan"]
    return [
        f"- Hardware: {hw['cpu']} ({hw['cores']} cores), {hw['ram_gb']} GiB RAM; {gpu}; mlx {hw.get('mlx')}, "
        f"mlx-lm {hw.get('mlx_lm')}, `mx.default_device()` = {hw.get('device')}; Python {hw['python']}",
        f"- Model: random-weight Llama, {shape}, {m['dtype']}{quant}, {m['weight_gb']} GiB of weights",
        f"- Command: `{meta['command']}`" + (f" (merged: {'; '.join(meta['merged'])})" if meta.get("merged") else ""),
        f"- Date: {meta['date']}; {plan['output_tokens']} output tokens per request (max_tokens), temperature "
        f"{plan['temperature']:g} (top_p 1) everywhere; N requests per level (ok/N below), closed loop with `conc` "
        "workers",
    ]


def _raw_section(raw: dict[str, Any]) -> list[str]:
    if "error" in raw and not raw.get("batch"):
        return [f"Raw ceiling not measured: {raw['error']}"]
    rows = [
        [
            "stream_generate",
            str(s["prompt_tokens"]),
            "1",
            fs(s["ttft_p50_s"]),
            "–",
            fr(s["decode_tok_s"]),
            fs(1 / s["decode_tok_s"]) if s["decode_tok_s"] else "–",
            "–",
        ]
        for s in raw.get("single", [])
    ]
    rows += [
        [
            "BatchGenerator",
            str(b["prompt_tokens"]),
            str(b["batch"]),
            fs(b["ttft_p50_s"]),
            fs(b["ttft_p95_s"]),
            fr(b["steady_decode_tok_s"]),
            fs(b["step_ms"] / 1000 if b["step_ms"] else None),
            fr(b["aggregate_tok_s"]),
        ]
        for b in raw.get("batch", [])
    ]
    out = _table(
        ["engine", "prompt", "batch", "TTFT p50", "TTFT p95", "steady decode tok/s", "step (ITL)", "aggregate tok/s"],
        rows,
    )
    if "load_warm_s" in raw:
        out.append("")
        out.append(
            f"`mlx_lm.load`: {fs(raw['load_first_s'])} first, {fs(raw['load_warm_s'])} warm (page cache); "
            f"first request after the warm load: TTFT {fs(raw['cold_ttft_after_load_s'])}."
        )
    return out


def _levels_section(res: dict[str, Any]) -> list[str]:
    raw, servers = res.get("raw", {}), res["servers"]
    lengths = sorted({lv["prompt_tokens"] for s in servers.values() for lv in s.get("levels", [])})
    out: list[str] = []
    for length in lengths:
        concs = sorted(
            {lv["concurrency"] for s in servers.values() for lv in s.get("levels", []) if lv["prompt_tokens"] == length}
        )
        rows = []
        for conc in concs:
            rb = _raw_batch(raw, length, conc)
            if rb:
                rows.append(
                    [
                        "raw BatchGenerator",
                        str(conc),
                        f"{conc}/{conc}",
                        fs(rb["ttft_p50_s"]),
                        fs(rb["ttft_p95_s"]),
                        fs(rb["step_ms"] / 1000 if rb["step_ms"] else None),
                        "–",
                        fr(rb["aggregate_tok_s"]),
                        "100%",
                        "1.00×",
                    ]
                )
            for key, s in servers.items():
                lv = _level(s, length, conc)
                if lv is None:
                    continue
                est = "~" if lv.get("tokens_estimated") else ""
                agg_vs = div(lv["aggregate_tok_s"], rb["aggregate_tok_s"]) if rb else None
                ok = f"{lv['ok']}/{lv['requested']}" + (" (time limit)" if lv.get("timed_out") else "")
                rows.append(
                    [
                        LABELS.get(key, key),
                        str(conc),
                        ok,
                        fs(lv["ttft_p50_s"]),
                        fs(lv["ttft_p95_s"]),
                        fs(lv["itl_p50_s"]),
                        fs(lv["tpot_p50_s"]),
                        est + fr(lv["aggregate_tok_s"]),
                        "–" if agg_vs is None else f"{agg_vs:.0%}",
                        fx(div(lv["ttft_p50_s"], rb["ttft_p50_s"]) if rb else None),
                    ]
                )
        out += [f"#### Prompt {length} tokens", ""]
        out += _table(
            [
                "server",
                "conc",
                "ok/N",
                "TTFT p50",
                "TTFT p95",
                "ITL p50",
                "TPOT p50",
                "agg tok/s",
                "agg vs raw",
                "TTFT vs raw",
            ],
            rows,
        )
        out.append("")
    return out


def _versus_section(res: dict[str, Any]) -> list[str]:
    servers = res["servers"]
    me = servers.get(SELF)
    peers = [k for k in servers if k != SELF and servers[k].get("levels")]
    if not me or not me.get("levels") or not peers:
        return []
    head = ["prompt", "conc"] + [
        f"{what} vs {LABELS.get(p, p)}" for p in peers for what in ("agg tok/s", "TTFT p50", "ITL p50")
    ]
    rows = []
    for lv in me["levels"]:
        row = [str(lv["prompt_tokens"]), str(lv["concurrency"])]
        for p in peers:
            plv = _level(servers[p], lv["prompt_tokens"], lv["concurrency"])
            row += [
                fx(div(lv["aggregate_tok_s"], plv["aggregate_tok_s"]) if plv else None),
                fx(div(plv["ttft_p50_s"], lv["ttft_p50_s"]) if plv else None),
                fx(div(plv["itl_p50_s"], lv["itl_p50_s"]) if plv else None),
            ]
        rows.append(row)
    return ["Ratios > 1 mean this repo is better (higher throughput, lower TTFT / ITL).", "", *_table(head, rows)]


def _prefix_swap_section(res: dict[str, Any]) -> list[str]:
    raw, servers = res.get("raw", {}), res["servers"]
    rp = raw.get("prefix")
    rows = []
    if rp:
        rows.append(
            [
                f"raw (cache kept in-process, {rp['prompt_tokens']} tokens)",
                fs(rp["cold_ttft_s"]),
                fs(rp["warm_ttft_s"]),
                fx(div(rp["cold_ttft_s"], rp["warm_ttft_s"])),
                "1.00×",
            ]
        )
    for key, s in servers.items():
        p = s.get("prefix")
        if p:
            rows.append(
                [
                    LABELS.get(key, key),
                    fs(p.get("cold_ttft_s")),
                    fs(p.get("warm_ttft_s")),
                    fx(div(p.get("cold_ttft_s"), p.get("warm_ttft_s"))),
                    fx(div(p.get("warm_ttft_s"), rp["warm_ttft_s"]) if rp else None),
                ]
            )
    out = ["#### Shared ~4k-token prefix, new final question", ""]
    out += _table(["server", "TTFT cold", "TTFT warm (p50)", "cold/warm", "warm vs raw"], rows)
    rows = []
    ceiling = raw.get("swap_ceiling_s")
    if ceiling:
        rows.append(["raw: `mlx_lm.load` + first TTFT", "–", fs(ceiling), "1.00×"])
    for key, s in servers.items():
        w = s.get("swap")
        if w:
            rows.append(
                [
                    LABELS.get(key, key),
                    fs(w.get("resident_ttft_s")),
                    fs(w.get("swap_ttft_s")),
                    fx(div(w.get("swap_ttft_s"), ceiling)),
                ]
            )
    out += ["", "#### Model swap (two copies of the model, one resident at a time)", ""]
    out += _table(["server", "TTFT, model resident", "TTFT after a swap (p50)", "vs raw load + TTFT"], rows)
    return out


def _notes(res: dict[str, Any]) -> list[str]:
    notes = list(res["meta"].get("plan", {}).get("notes", []))
    for key, s in res["servers"].items():
        label = LABELS.get(key, key)
        if s.get("status") != "ok":
            notes.append(f"{label}: {s.get('status')}: {s.get('reason')}")
        if s.get("flags"):
            notes.append(f"{label} flags: {s['flags']}")
        notes += [f"{label}: {n}" for n in s.get("notes", [])]
        for lv in s.get("levels", []):
            if lv.get("errors"):
                notes.append(f"{label} @ {lv['prompt_tokens']}×{lv['concurrency']}: errors: {'; '.join(lv['errors'])}")
        bursts = [
            lv
            for lv in s.get("levels", [])
            if (lv.get("stream_spread") or 0) < 0.05 and (lv.get("completion_tokens_p50") or 0) > 4
        ]
        if bursts:
            notes.append(
                f"{label}: the streamed text arrives in one burst after generation ends (first-to-last chunk"
                " time < 5% of TTFT), so its TTFT is the whole generation time and its ITL is meaningless"
            )
        for part in ("prefix", "swap"):
            if s.get(part, {}).get("errors"):
                notes.append(f"{label} {part}: {'; '.join(s[part]['errors'])}")
    notes += res.get("notes", [])
    notes.append(
        "`~` marks token counts re-tokenized from the streamed text (server sent no usage). TTFT = send to "
        "first content chunk; ITL = gap between content chunks; TPOT = (last - first chunk) / (tokens - 1); "
        "agg tok/s = completion tokens of the level / its wall time. Raw rows use the first `conc` prompts "
        "of the same level, all inserted at once, no stop tokens."
    )
    return [f"- {n}" for n in notes]


def render(res: dict[str, Any]) -> str:
    meta = res["meta"]
    title = f"## Results: {meta['size']}{' (quick)' if meta.get('quick') else ''}"
    parts = [
        title,
        "",
        *_header(meta),
        "",
        "### Raw engine ceiling (mlx-lm in-process, no HTTP)",
        "",
        *_raw_section(res.get("raw", {})),
        "",
        "### Servers under load",
        "",
        *_levels_section(res),
    ]
    versus = _versus_section(res)
    if versus:
        parts += ["### This repo vs peers", "", *versus, ""]
    parts += ["### Prefix cache and model swap", "", *_prefix_swap_section(res), "", "### Notes", "", *_notes(res)]
    return "\n".join(parts) + "\n"
