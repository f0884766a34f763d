"""Benchmark model folders, all from `helper_tools.tiny_models.build_random_model`.

* ``cpu``: a small float32 random Llama (fast enough for MLX's CPU backend on a 2-core box).
* ``gpu``: random weights in the real shape of Llama-3.1-8B, bfloat16; ``--quantize 4`` adds a 4-bit copy.

Run as a child process (``python benchmarks/bench_models.py --size gpu --dest DIR``) so that the memory taken while
building (an 8B model is initialised in float32 first) is returned before any server starts.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CPU_SHAPE: dict[str, Any] = {
    "hidden_size": 128,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "intermediate_size": 256,
    "max_position_embeddings": 8192,
    "dtype": "float32",
}
LLAMA31_8B_SHAPE: dict[str, Any] = {
    "hidden_size": 4096,
    "num_layers": 32,
    "num_heads": 32,
    "num_kv_heads": 8,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "vocab_size": 128256,
    "dtype": "bfloat16",
}
LLAMA31_CONFIG = {  # config-only fields of Llama-3.1 (no effect on the weights)
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
}
MARKER = ".bench-build.json"  # written last: a folder without it is an interrupted build


def _marker(dest: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads((dest / MARKER).read_text())
        return data
    except (OSError, ValueError):
        return None


def build(size: str, dest: Path, *, quantize_bits: int | None = None) -> Path:
    """Build (or reuse, when its marker matches) the model folder for `size`; returns the folder to serve."""
    from helper_tools.tiny_models import build_random_model

    shape = CPU_SHAPE if size == "cpu" else LLAMA31_8B_SHAPE
    want = {"size": size, "shape": shape}
    if _marker(dest) != want:
        if dest.exists():
            shutil.rmtree(dest)
        started = time.perf_counter()
        build_random_model(dest, **shape)
        if size == "gpu":
            cfg_path = dest / "config.json"
            cfg = json.loads(cfg_path.read_text())
            cfg.update(LLAMA31_CONFIG)
            cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
        (dest / MARKER).write_text(json.dumps(want))
        print(f"built {size} model in {time.perf_counter() - started:.1f}s: {dest}", flush=True)
    if not quantize_bits:
        return dest
    qdest = dest.with_name(f"{dest.name}-q{quantize_bits}")
    qwant = {**want, "quantized_from": str(dest), "bits": quantize_bits, "group_size": 64}
    if _marker(qdest) != qwant:
        quantize(dest, qdest, quantize_bits)
        (qdest / MARKER).write_text(json.dumps(qwant))
    return qdest


def quantize(src: Path, dest: Path, bits: int, group_size: int = 64) -> None:
    """A quantized copy: `mlx.nn.quantize` on the loaded model, weights saved with a `quantization` config entry."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm import load

    started = time.perf_counter()
    model, _ = load(str(src))[:2]
    nn.quantize(model, group_size=group_size, bits=bits)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(dest / "model.safetensors"), weights, metadata={"format": "mlx"})
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", MARKER):
            shutil.copy2(f, dest / f.name)
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization"] = {"group_size": group_size, "bits": bits}
    (dest / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    print(f"quantized to {bits} bits in {time.perf_counter() - started:.1f}s: {dest}", flush=True)


def describe(folder: Path) -> dict[str, Any]:
    """Shape, dtype, parameter count and weight size of a model folder, from its files only."""
    cfg = json.loads((folder / "config.json").read_text())
    weight_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    keys = (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "vocab_size",
        "max_position_embeddings",
        "rope_theta",
    )
    return {
        "path": str(folder),
        **{k: cfg.get(k) for k in keys},
        "dtype": cfg.get("torch_dtype"),
        "quantization": cfg.get("quantization"),
        "weight_gb": round(weight_bytes / 1024**3, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build a benchmark model folder.")
    parser.add_argument("--size", choices=["cpu", "gpu"], required=True)
    parser.add_argument("--dest", type=Path, required=True)
    parser.add_argument("--quantize", type=int, default=None, metavar="BITS")
    parser.add_argument("--print-path", type=Path, default=None, help="write the folder to serve to this file")
    args = parser.parse_args(argv)
    folder = build(args.size, args.dest, quantize_bits=args.quantize)
    if args.print_path:
        args.print_path.write_text(str(folder))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
