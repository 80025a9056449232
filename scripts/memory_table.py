"""Print the memory table of docs/CONFIG.md: the bundled transport's buffers per GPU for
serving configs (configs/*.yaml), under `mode: auto` as it was (the decode path only, sized
by --max-num-batched-tokens) and as it is (the decode path sized by the largest CUDA-graph
capture size, plus the prefill path's ring). The bytes come from the kernels' own layout
code (`moe_plugin.transport.bundled.footprint`); the library is built for sm_90 with nvcc,
no GPU needed.

    python scripts/memory_table.py configs/*.yaml
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
from collections.abc import Sequence

import torch
import yaml

from moe_plugin.kernels.binding import Library
from moe_plugin.kernels.build import ensure_built
from moe_plugin.transport.base import TransportSpec
from moe_plugin.transport.bundled.footprint import path_bytes

MiB = 1 << 20
DEFAULT_CAPTURE_CEILING = 512
"""vLLM's largest capture size on H100/H200 unless set: min(512, 2 * max_num_seqs), and at
most max_num_batched_tokens (its default max_num_seqs there is 1024)."""


@dataclasses.dataclass(frozen=True)
class Model:
    """What sizes a MoE layer's transport: hidden size, top-k, routed experts, and whether
    the tokens travel as block-128 fp8 (block-fp8 checkpoints with fp8-input experts)."""

    hidden: int
    top_k: int
    experts: int
    fp8: bool


MODELS = {
    "deepseek-ai/DeepSeek-V3": Model(hidden=7168, top_k=8, experts=256, fp8=True),
    "Qwen/Qwen3-30B-A3B": Model(hidden=2048, top_k=8, experts=128, fp8=False),
    "mistralai/Mixtral-8x7B-Instruct-v0.1": Model(hidden=4096, top_k=2, experts=8, fp8=False),
}


@dataclasses.dataclass(frozen=True)
class Row:
    """One config's buffers per GPU, in bytes."""

    name: str
    gpus: int
    step_tokens: int
    graph_tokens: int
    payload: str
    old_auto: int
    decode: int
    prefill: int

    @property
    def new_auto(self) -> int:
        return self.decode + self.prefill


def graph_tokens(config: dict) -> int:
    """The largest CUDA-graph capture size a config gives vLLM (see DEFAULT_CAPTURE_CEILING)."""
    compilation = config.get("compilation-config") or {}
    if isinstance(compilation, str):
        compilation = json.loads(compilation)
    sizes = compilation.get("cudagraph_capture_sizes")
    largest = max(sizes) if sizes else compilation.get("max_cudagraph_capture_size")
    return min(largest or DEFAULT_CAPTURE_CEILING, config["max-num-batched-tokens"])


def row(path: pathlib.Path, lib: Library) -> Row:
    """The buffers per GPU of the serving config at `path` (bundled transport)."""
    config = yaml.safe_load(path.read_text())
    model = MODELS[config["model"]]
    gpus = config["data-parallel-size"] * config.get("tensor-parallel-size", 1)
    step = config["max-num-batched-tokens"]
    graphs = graph_tokens(config)

    def spec(tokens: int) -> TransportSpec:
        return TransportSpec(
            max_tokens_per_rank=tokens,
            hidden=model.hidden,
            num_topk=model.top_k,
            num_experts=model.experts,
            dtype=torch.float8_e4m3fn if model.fp8 else torch.bfloat16,
        )

    return Row(
        name=path.name,
        gpus=gpus,
        step_tokens=step,
        graph_tokens=graphs,
        payload="fp8" if model.fp8 else "bf16",
        old_auto=path_bytes(spec(step), gpus, "decode", lib),
        decode=path_bytes(spec(graphs), gpus, "decode", lib),
        prefill=path_bytes(spec(step), gpus, "prefill", lib),
    )


def markdown(rows: Sequence[Row]) -> str:
    """The rows as a markdown table, sizes in MiB."""
    lines = [
        "| config | GPUs | payload | max-num-batched-tokens | largest capture size "
        "| decode only, sized by max-num-batched-tokens | decode, sized by the capture size "
        "| prefill ring | auto now |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.name} | {r.gpus} | {r.payload} | {r.step_tokens} | {r.graph_tokens} "
            f"| {r.old_auto / MiB:,.0f} MiB | {r.decode / MiB:,.0f} MiB "
            f"| {r.prefill / MiB:,.0f} MiB | {r.new_auto / MiB:,.0f} MiB |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="+", type=pathlib.Path)
    args = parser.parse_args(argv)
    lib = Library(ensure_built(["90"]))
    print(markdown([row(p, lib) for p in args.configs]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
