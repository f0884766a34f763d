"""Markdown for one benchmark result (the JSON that bench.py writes): a summary with every ratio first, then the
detail per prompt length, the prefix and swap probes, and notes."""

from __future__ import annotations

from typing import Any

from bench_common import median
from bench_servers import LABELS

SELF, PEERS = "mlx_router", ("mlx_lm", "mlx_router_231")
Row = dict[str, Any] | None


def fs(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def fr(rate: float | None) -> str:
    return "–" if rate is None else f"{rate:,.0f}" if rate >= 100 else f"{rate:.1f}"


def better(ours: float | None, other: float | None, higher_is_better: bool) -> str:
    """This repo against another figure, > 1 when this repo is better (more tokens/s, less time)."""
    if ours is None or other is None or not ours or not other:
        return "–"
    return f"{(ours / other if higher_is_better else other / ours):.2f}×"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def _find(rows: list[dict[str, Any]], length: int, conc: int | None = None) -> Row:
    return next((r for r in rows if r["prompt_tokens"] == length and conc in (None, r.get("concurrency"))), None)


def _burst(lv: Row) -> bool:
    """More content chunks than tokens: the server re-sends text it had already generated (mlx-router 2.3.1 runs
    `mlx_lm.generate` for the whole answer, then streams it a character at a time). Its TTFT is then the whole
    generation, and its time per token is no decode step: ITL and decode rate are shown as `burst`."""
    return bool(lv and (lv.get("chunks_per_token") or 0) > 1.5)


def _get(row: Row, key: str) -> float | None:
    """A figure of a level; ITL and decode rate are meaningless for a burst."""
    if row is None or (key in ("itl_p50_s", "decode_tok_s_p50") and _burst(row)):
        return None
    return row.get(key)


def _value(part: dict[str, Any], is_raw: bool, spec: tuple[Any, ...]) -> tuple[float | None, str]:
    """One summary figure of the raw ceiling or of a server (`spec` names it, see _summary), and a remark when not
    every request of its level succeeded."""
    kind, row = spec[0], None
    if kind == "level":  # raw at concurrency 1: stream_generate
        _, n, c, key = spec
        single_raw = is_raw and c == 1
        row = _find(part.get("stream" if single_raw else "levels", []), n, None if single_raw else c)
    elif kind == "single":
        row, key = part.get("single"), "decode_tok_s_p50"
    partial = f" ({row['ok']}/{row['requested']} ok)" if row and row["ok"] < row["requested"] else ""
    if kind in ("level", "single"):
        return _get(row, key), partial
    prefix = part.get("prefix") or {}
    if kind == "prefix_warm":
        return prefix.get("warm_ttft_s"), ""
    if kind == "prefix_gain":
        cold, warm = prefix.get("cold_ttft_s"), prefix.get("warm_ttft_s")
        return (cold / warm if cold and warm else None), ""
    return (part.get("swap_ceiling_s") if is_raw else (part.get("swap") or {}).get("swap_ttft_s")), ""


def _summary(res: dict[str, Any]) -> list[str]:
    raw, servers = res.get("raw", {}), res["servers"]
    levels = res["meta"]["plan"]["levels"]
    specs: list[tuple[str, tuple[Any, ...], bool, Any]] = []  # label, figure, higher is better, format
    for n in sorted({lv["prompt_tokens"] for lv in levels}):
        specs.append(
            (
                f"{n}-token prompts, c=1: decode tok/s (raw: stream_generate)",
                ("level", n, 1, "decode_tok_s_p50"),
                True,
                fr,
            )
        )
        specs.append((f"{n}-token prompts, c=1: TTFT (raw: stream_generate)", ("level", n, 1, "ttft_p50_s"), False, fs))
        for c in sorted(lv["concurrency"] for lv in levels if lv["prompt_tokens"] == n and lv["concurrency"] > 1):
            specs.append((f"{n}-token prompts, c={c}: aggregate tok/s", ("level", n, c, "aggregate_tok_s"), True, fr))
            specs.append((f"{n}-token prompts, c={c}: TTFT p50", ("level", n, c, "ttft_p50_s"), False, fs))
    if res["meta"]["model"].get("single"):
        specs.append(("4-bit model, 128-token prompts, c=1: decode tok/s", ("single",), True, fr))
    ptoks = res["meta"]["plan"]["prefix_tokens"]
    specs.append((f"~{ptoks}-token shared prefix, new question: warm TTFT", ("prefix_warm",), False, fs))
    specs.append(("prefix: cold / warm TTFT", ("prefix_gain",), True, lambda x: "–" if x is None else f"{x:.1f}×"))
    specs.append(("swap: TTFT when the model must be loaded first (raw: load + first TTFT)", ("swap",), False, fs))
    peers = [p for p in PEERS if p in servers]
    head = ["figure", "raw mlx-lm", LABELS[SELF], "vs raw"] + [x for p in peers for x in (LABELS[p], f"vs {LABELS[p]}")]
    rows = []
    for label, spec, higher, fmt in specs:
        ours, ours_note = _value(servers.get(SELF, {}), False, spec)
        raw_v, raw_note = _value(raw, True, spec)
        row = [label, fmt(raw_v) + raw_note, fmt(ours) + ours_note, better(ours, raw_v, higher)]
        for p in peers:
            theirs, note = _value(servers[p], False, spec)
            row += [fmt(theirs) + note, better(ours, theirs, higher)]
        rows.append(row)
    if (c1 := raw.get("engine_c1")) and "engine" in c1:
        label = "128-token prompts, c=1, one process: decode tok/s of this repo's engine (no HTTP), paired"
        mid = c1["ratio_median"]
        ratio = "–" if mid is None else f"{mid:.2f}× (median of {c1['pairs']} pairs)"
        rows.append(
            [label, fr(c1["stream"]["decode_tok_s_p50"]), fr(c1["engine"]["decode_tok_s_p50"]), ratio]
            + ["–", "–"] * len(peers)
        )
    lead = (
        "Ratios: this repo against the figure on their left; > 1 means this repo is better (more tokens/s, less time)."
    )
    return [lead, "", *_table(head, rows)]


def _detail(res: dict[str, Any]) -> list[str]:
    raw, servers = res.get("raw", {}), res["servers"]
    out: list[str] = []
    for n in sorted({lv["prompt_tokens"] for s in [raw, *servers.values()] for lv in s.get("levels", [])}):
        rows = []
        concs = sorted(
            {
                lv["concurrency"]
                for s in [raw, *servers.values()]
                for lv in s.get("levels", [])
                if lv["prompt_tokens"] == n
            }
        )
        for c in concs:
            rl = _find(raw.get("levels", []), n, c)
            named = [
                ("raw stream_generate", _find(raw.get("stream", []), n) if c == 1 else None),
                ("raw BatchGenerator", rl),
            ]
            named += [(LABELS[k], _find(s.get("levels", []), n, c)) for k, s in servers.items()]
            for label, lv in named:
                if lv is None:
                    continue
                ok = f"{lv['ok']}/{lv['requested']}" + (" (time limit)" if lv.get("timed_out") else "")
                itl = "burst" if _burst(lv) else fs(lv["itl_p50_s"])
                tokens = ("≤" if lv.get("tokens_assumed") else "") + fr(lv["aggregate_tok_s"]) + _spread(lv)
                rows.append(
                    [
                        label,
                        str(c),
                        ok,
                        fs(lv["ttft_p50_s"]),
                        fs(lv["ttft_p95_s"]),
                        itl,
                        fr(_get(lv, "decode_tok_s_p50")),
                        tokens,
                        better(lv["aggregate_tok_s"], _get(rl, "aggregate_tok_s"), True),
                    ]
                )
        out += [f"#### {n}-token prompts", ""]
        out += _table(
            [
                "server",
                "conc",
                "ok/N",
                "TTFT p50",
                "TTFT p95",
                "ITL p50",
                "decode tok/s p50",
                "aggregate tok/s",
                "aggregate / raw BatchGenerator",
            ],
            rows,
        )
        out.append("")
    return out


def _probes(res: dict[str, Any]) -> list[str]:
    raw, servers = res.get("raw", {}), res["servers"]
    rp = raw.get("prefix")
    rows = [["raw (KV cache kept in-process)", fs(rp["cold_ttft_s"]), fs(rp["warm_ttft_s"])]] if rp else []
    rows += [
        [LABELS[k], fs(s["prefix"].get("cold_ttft_s")), fs(s["prefix"].get("warm_ttft_s"))]
        for k, s in servers.items()
        if s.get("prefix")
    ]
    out = ["#### Shared prefix, new final question (TTFT)", "", *_table(["", "cold", "warm (p50)"], rows), ""]
    rows = (
        [["raw: `mlx_lm.load` + first TTFT", "–", fs(raw.get("swap_ceiling_s"))]] if raw.get("swap_ceiling_s") else []
    )
    rows += [
        [LABELS[k], fs(s["swap"].get("resident_ttft_s")), fs(s["swap"].get("swap_ttft_s"))]
        for k, s in servers.items()
        if s.get("swap")
    ]
    if raw.get("swap_load_s") is not None:
        rows.append(["(raw: of which `mlx_lm.load`)", "–", fs(raw["swap_load_s"])])
    return [
        *out,
        "#### Model swap (two copies of one model, one resident at a time)",
        "",
        *_table(["", "TTFT, model resident", "TTFT after a swap (p50)"], rows),
        *_engine_c1(raw.get("engine_c1")),
    ]


def _engine_c1(c1: dict[str, Any] | None) -> list[str]:
    """bench_engine.engine_vs_stream: the engine and stream_generate in one process, request by request."""
    if not c1:
        return []
    title = "#### Concurrency 1 in one process: this repo's engine against stream_generate"
    if "error" in c1:
        return ["", title, "", f"Not measured: {c1['error']}"]
    lead = (
        "In the raw engine's process, after its levels: this repo's `ModelEngine` (its own copy of the model, "
        "events read on an asyncio loop, no HTTP) and `stream_generate`, one request each in turn on the same "
        "prompt, alternating which goes first. Two processes' CPUs can differ in speed at the same moment, and a "
        "single stream's decode step is bound by the CPU: these pairs take the process out of the comparison (not "
        "the core each thread happens to run on)."
    )
    row = [
        str(c1["pairs"]),
        fr(c1["stream"]["decode_tok_s_p50"]),
        fr(c1["engine"]["decode_tok_s_p50"]),
        ", ".join(f"{x:.2f}×" for x in c1["ratios"]),
        "–" if c1["ratio_median"] is None else f"{c1['ratio_median']:.2f}×",
    ]
    head = ["pairs", "stream_generate decode p50", "engine decode p50", "engine / stream_generate per pair", "median"]
    return ["", title, "", lead, "", *_table(head, [row])]


def _paired(res: dict[str, Any]) -> list[str]:
    """Each pass of this repo against the raw pass run next to it (bench.py pairs them level by level), and the
    median of those ratios: the figure least moved by a host whose speed drifts between passes."""
    raw, ours = res.get("raw", {}), res["servers"].get(SELF, {})
    if not res["meta"].get("paired") or not ours.get("levels"):
        return []
    rows = []
    for lv in ours["levels"]:
        n, c = lv["prompt_tokens"], lv["concurrency"]
        if c == 1:
            rs = _find(raw.get("stream", []), n)
            figures = [("decode tok/s", "passes_decode_tok_s_p50", True), ("TTFT p50", "passes_ttft_p50_s", False)]
        else:
            rs = _find(raw.get("levels", []), n, c)
            figures = [("aggregate tok/s", "passes_aggregate_tok_s", True)]
        for label, key, higher in figures:
            theirs, mine = (rs or {}).get(key) or [], lv.get(key) or []
            pairs = [(a, b) for a, b in zip(theirs, mine, strict=False) if a and b]
            if not pairs:
                continue
            fmt = fr if higher else fs
            if higher:  # a ratio; for a time, the difference (this repo - raw) says more than a ratio of ms
                per = [b / a for a, b in pairs]
                shown, mid = [f"{x:.2f}×" for x in per], f"{median(per):.2f}×"
            else:
                per = [b - a for a, b in pairs]
                shown, mid = [f"{x * 1000:+.1f} ms" for x in per], f"{median(per) * 1000:+.1f} ms"
            rows.append(
                [
                    f"{n}x{c}",
                    label,
                    ", ".join(fmt(a) for a, _ in pairs),
                    ", ".join(fmt(b) for _, b in pairs),
                    ", ".join(shown),
                    mid,
                ]
            )
    head = ["level", "figure", "raw passes", f"{LABELS[SELF]} passes", "per pass", "median"]
    lead = (
        "Each pass of this repo ran right after or before the raw engine's pass of the same level (alternating), "
        "with the raw engine's process kept loaded and idle meanwhile. Per pass: this repo / raw for rates, this "
        "repo - raw for times; c=1 compares with `stream_generate`."
    )
    return ["#### Paired passes", "", lead, "", *_table(head, rows), ""]


def _spread(lv: dict[str, Any]) -> str:
    rates = lv.get("passes_aggregate_tok_s") or []
    return f" ({', '.join(fr(r) for r in rates)})" if len(rates) > 1 else ""


def _header(res: dict[str, Any]) -> list[str]:
    meta = res["meta"]
    hw, plan = meta["hardware"], meta["plan"]
    gpu = f"GPU: {hw['gpu']}" if hw.get("gpu") else "no GPU"

    def model(m: dict[str, Any]) -> str:
        q = f", {m['quantization']['bits']}-bit (group {m['quantization']['group_size']})" if m["quantization"] else ""
        return (
            f"random-weight Llama, hidden {m['hidden_size']}, {m['num_hidden_layers']} layers, "
            f"{m['num_attention_heads']} heads ({m['num_key_value_heads']} kv), intermediate "
            f"{m['intermediate_size']}, vocab {m['vocab_size']}, {m['dtype']}{q}, {m['weight_gb']} GB"
        )

    lines = [
        f"- Hardware: {hw['cpu']} ({hw['cores']} cores), {hw['ram_gb']} GiB RAM; {gpu}; mlx {hw.get('mlx')}, "
        f"mlx-lm {hw.get('mlx_lm')}, MLX device {hw.get('device')}; Python {hw['python']}",
        f"- Model: {model(meta['model']['main'])}",
    ]
    if meta["model"].get("single"):
        lines.append(f"- Single-stream and swap model: {model(meta['model']['single'])}")
    return [
        *lines,
        f"- Command: `{meta['command']}` ({meta['date']})"
        + "".join(f"; merged with `{c}`" for c in meta.get("merged", [])),
        f"- Load: {plan['output_tokens']} output tokens per request (max_tokens), temperature "
        f"{plan['temperature']:g}, top_p 1, the same request body and prompts for every server; a level sends N "
        "requests (ok/N) through `conc` workers, each sending its next request when the last one ends"
        + (
            f"; each level ran {plan['passes']} times with new prompts, and a row is the pass with the median "
            "aggregate tok/s (all passes' aggregates in brackets)"
            if plan.get("passes", 1) > 1
            else ""
        )
        + _by_part(res, "passes", plan.get("passes", 1), "passes per level")
        + (
            f"; the servers' load came from {plan['client_procs']} client processes, each with its own event loop and "
            "SDK client, so that building requests in one process does not delay the level's first requests"
            if plan.get("client_procs", 1) > 1
            else ""
        )
        + _by_part(res, "client_procs", plan.get("client_procs", 1), "client processes", servers_only=True),
    ]


def _by_part(res: dict[str, Any], key: str, last: int, what: str, servers_only: bool = False) -> str:
    """Parts merged from runs whose setting `key` differed from the last command's."""
    parts = [*([] if servers_only else [("raw", res.get("raw", {}))]), *res["servers"].items()]
    other = [f"{LABELS.get(k, k)}: {p[key]}" for k, p in parts if p.get(key, last) != last]
    return f" ({what} where another run gave them: {', '.join(other)})" if other else ""


def _recount(res: dict[str, Any], server: dict[str, Any]) -> str:
    """The check on a no-usage server's credit: its answers re-tokenized, scaled by how the answers of the servers
    with usage re-tokenize (text decoded from random token ids does not always encode back to as many tokens)."""
    levels = res["servers"].values()
    known = [lv for s in levels for lv in s.get("levels", []) if lv.get("text_tokens") and not lv.get("tokens_assumed")]
    mine = [lv for lv in server.get("levels", []) if lv.get("text_tokens") and lv.get("tokens_assumed")]
    if not known or not mine:
        return ""
    scale = sum(lv["text_tokens"] for lv in known) / sum(lv["completion_tokens"] for lv in known)
    answers = sum(lv["ok"] for lv in mine)
    per_answer = sum(lv["text_tokens"] for lv in mine) / answers
    share = per_answer / scale / res["meta"]["plan"]["output_tokens"]
    return (
        f"; re-tokenized, its answers hold {per_answer:.0f} tokens on average, where the answers of the servers that "
        f"send usage re-tokenize to {scale:.0%} of their usage count: its token figures are about {share:.0%} of "
        "the `≤` ones"
    )


def _notes(res: dict[str, Any]) -> list[str]:
    notes = list(res.get("notes", []))
    if res.get("raw", {}).get("error"):
        notes.append(f"raw engine: {res['raw']['error']}")
    for key, s in res["servers"].items():
        label = LABELS[key]
        if s.get("status") != "ok":
            notes.append(f"{label}: {s.get('status')}: {s.get('reason')}")
        if s.get("flags"):
            notes.append(f"{label} flags: {s['flags']}")
        notes += [f"{label}: {n}" for n in s.get("notes", [])]
        for lv in s.get("levels", []):
            if lv["errors"]:
                notes.append(f"{label} {lv['prompt_tokens']}x{lv['concurrency']}: {'; '.join(lv['errors'])}")
        for part in ("prefix", "single", "swap"):
            if (s.get(part) or {}).get("errors"):
                notes.append(f"{label} {part}: {'; '.join(s[part]['errors'])}")
        if any(_burst(lv) for lv in s.get("levels", [])):
            notes.append(
                f"{label} sends more chunks than tokens (text it generated before streaming): its TTFT is the whole "
                "generation, its ITL and decode rate are shown as `burst`"
            )
        if any(lv.get("tokens_assumed") for lv in s.get("levels", [])):
            notes.append(
                f"{label} sends no usage: each answer is credited max_tokens (`≤`: an upper bound)" + _recount(res, s)
            )
    counted = [lv for s in res["servers"].values() for lv in s.get("levels", []) if not lv.get("tokens_assumed")]
    if n := sum(lv["ok"] for lv in counted):
        fill = sum(lv["completion_tokens"] for lv in counted) / (n * res["meta"]["plan"]["output_tokens"])
        notes.append(
            f"{sum(lv['early_stops'] for lv in counted)} of {n} answers of the servers that send usage ended before "
            f"max_tokens (the random model sampled its end token); they averaged {fill:.0%} of max_tokens, so a "
            f"figure credited max_tokens (`≤`) may be up to {1 / fill - 1:.0%} too high"
        )
    notes.append(
        "TTFT: request sent to first content (p50, p95 over a level's requests); ITL: per request, (end of "
        "stream - first content) / (tokens - 1), the time per output token after the first, p50 over requests "
        "(independent of how a detokenizer groups tokens into chunks); decode tok/s: 1 / ITL, p50; aggregate: "
        "a level's output tokens / its wall time. Raw rows: mlx-lm in-process, the same token ids, sampler and "
        "stop tokens, BatchGenerator fed by the same closed loop (prefill batch 8, prefill step 2048: mlx-lm's "
        "defaults)."
    )
    return [f"- {n}" for n in notes]


def render(res: dict[str, Any]) -> str:
    meta = res["meta"]
    parts = [
        f"### Results: {meta['size']}{' (tiny)' if meta.get('tiny') else ''}",
        "",
        *_header(res),
        "",
        "#### Summary",
        "",
        *_summary(res),
        "",
        *_paired(res),
        *_detail(res),
        *_probes(res),
        "",
        "#### Notes",
        "",
        *_notes(res),
    ]
    return "\n".join(parts) + "\n"
