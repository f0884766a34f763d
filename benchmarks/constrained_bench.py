"""Compare grammar engines for constrained decoding: tokenizer set-up, schema compile time, mask time per token.

The evidence behind choosing llguidance (see BENCHMARKS.md). Trains a byte-level BPE tokenizer of `--vocab` tokens on
Python's own standard-library sources (no download), then walks one schema-valid answer token by token through each
engine that is installed (llguidance, xgrammar, outlines-core), timing the mask it computes before every token.

    python benchmarks/constrained_bench.py --vocab 50000
    pip install xgrammar outlines-core   # to compare them too (xgrammar pulls in PyTorch)
"""

from __future__ import annotations

import argparse
import json
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
        },
    },
    "required": ["name", "age", "tags", "address"],
    "additionalProperties": False,
}
ANSWER = {"name": "Ada Lovelace", "age": 36, "tags": ["math", "poetry"], "address": {"city": "London", "zip": "12345"}}


def train_tokenizer(vocab: int, out: Path) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    sources = [p for p in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))[:3000] if _is_utf8(p)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train([str(p) for p in sources], trainer)
    tok.save(str(out))
    return PreTrainedTokenizerFast(tokenizer_file=str(out), eos_token="<|endoftext|>")


def _is_utf8(path: Path) -> bool:
    try:
        path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return False
    return True


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def bench_llguidance(hf: Any, ids: list[int]) -> tuple[float, float, list[float]]:
    import llguidance.hf
    from llguidance import LLMatcher

    ll, setup = timed(lambda: llguidance.hf.from_tokenizer(hf))
    grammar = LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})
    matcher, compile_s = timed(lambda: LLMatcher(ll, grammar))
    per = []
    for tid in ids:
        mask, t = timed(lambda: np.unpackbits(np.frombuffer(matcher.compute_bitmask(), np.uint8), bitorder="little"))
        per.append(t)
        assert mask[tid] and matcher.consume_token(tid)
    return setup, compile_s, per


def bench_xgrammar(hf: Any, ids: list[int]) -> tuple[float, float, list[float]]:
    import xgrammar as xgr

    compiler, setup = timed(lambda: xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(hf, vocab_size=len(hf))))
    compiled, compile_s = timed(
        lambda: compiler.compile_json_schema(SCHEMA, any_whitespace=False, separators=(",", ":"))
    )
    matcher, bitmask, per = xgr.GrammarMatcher(compiled), xgr.allocate_token_bitmask(1, len(hf)), []
    for tid in ids:
        start = time.perf_counter()
        matcher.fill_next_token_bitmask(bitmask)
        mask = np.unpackbits(bitmask.numpy().view(np.uint8), bitorder="little")
        per.append(time.perf_counter() - start)
        assert mask[tid] and matcher.accept_token(tid)
    return setup, compile_s, per


def bench_outlines_core(hf: Any, ids: list[int]) -> tuple[float, float, list[float]]:
    import outlines_core
    from outlines_core.json_schema import build_regex_from_schema

    def vocabulary() -> Any:
        tokens: dict[str, list[int]] = {}
        for token, i in hf.get_vocab().items():
            if i != hf.eos_token_id:
                tokens.setdefault(token, []).append(i)
        return outlines_core.Vocabulary(hf.eos_token_id, tokens)

    vocab, setup = timed(vocabulary)
    index, compile_s = timed(lambda: outlines_core.Index(build_regex_from_schema(json.dumps(SCHEMA)), vocab))
    guide, per = outlines_core.Guide(index), []
    for tid in ids:
        allowed, t = timed(guide.get_tokens)
        per.append(t)
        assert tid in allowed
        guide.advance(tid)
    return setup, compile_s, per


ENGINES = {"llguidance": bench_llguidance, "xgrammar": bench_xgrammar, "outlines-core": bench_outlines_core}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=50000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        hf = train_tokenizer(args.vocab, Path(tmp) / "tokenizer.json")
    ids = hf.encode(json.dumps(ANSWER, separators=(",", ":")))
    print(f"vocabulary {len(hf)} tokens; answer {len(ids)} tokens\n")
    print("| engine | tokenizer set-up | schema compile | mask per token (mean / p95) |")
    print("| --- | --- | --- | --- |")
    for name, bench in ENGINES.items():
        try:
            setup, compile_s, per = bench(hf, ids)
        except ImportError:
            print(f"| {name} | not installed | | |")
            continue
        mean, p95 = np.mean(per) * 1e6, np.percentile(per, 95) * 1e6
        print(f"| {name} | {setup * 1e3:.0f} ms | {compile_s * 1e3:.1f} ms | {mean:.0f} / {p95:.0f} µs |")


if __name__ == "__main__":
    main()
