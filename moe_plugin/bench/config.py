"""What one benchmark run measures: shape presets, token counts, SM budgets, iterations."""

from __future__ import annotations

import dataclasses

DECODE, PREFILL = "decode", "prefill"
MODES = (DECODE, PREFILL)
DTYPES = ("bf16", "fp8")
DISPATCH, COMBINE = "dispatch", "combine"

DECODE_TOKENS = 128
PREFILL_TOKENS = 4096
DECODE_SWEEP = (1, 2, 4, 8, 16, 32, 64, 128, 256)
PREFILL_SWEEP = (512, 1024, 2048, 4096, 8192, 16384)
DEFAULT_NUM_SMS = 24
NUM_SMS_SWEEP: tuple[int | str, ...] = (8, 16, 24, 32, 64, "all")
"""SM budgets of the bundled prefill kernels; "all" is every SM of the device."""
GRAPH_OPS = 16
"""Decode: calls captured back to back in one CUDA graph for the amortized timing."""
MIN_GRAPH_REPLAYS = 50


@dataclasses.dataclass(frozen=True)
class Preset:
    """The MoE layer shape of one model: hidden size, routed experts, experts per token."""

    name: str
    hidden: int
    num_experts: int
    num_topk: int


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("deepseek-v3", hidden=7168, num_experts=256, num_topk=8),
        Preset("qwen3-30b-a3b", hidden=2048, num_experts=128, num_topk=8),
        Preset("mixtral", hidden=4096, num_experts=8, num_topk=2),
    )
}


@dataclasses.dataclass(frozen=True)
class Iterations:
    """Timed and untimed (warm-up) dispatch+combine pairs per case."""

    timed: int
    warmup: int


def default_iterations(mode: str, on_gpu: bool) -> Iterations:
    """GPU decode: >= 200 timed graph replays. CPU (gloo): few, so a run stays short (the
    correctness check before timing warms the prefill path up)."""
    if on_gpu:
        return Iterations(200, 20) if mode == DECODE else Iterations(30, 5)
    return Iterations(10, 1) if mode == DECODE else Iterations(1, 0)


def graph_iterations(iters: Iterations, ops: int) -> Iterations:
    """Replays of a CUDA graph holding `ops` calls, for `iters` calls per case: at least
    `MIN_GRAPH_REPLAYS` (or `iters.timed` when that is fewer), and at least `iters.timed`
    calls in all; warm-up calls rounded up to whole replays."""
    return Iterations(
        max(-(-iters.timed // ops), min(iters.timed, MIN_GRAPH_REPLAYS)), -(-iters.warmup // ops)
    )


@dataclasses.dataclass(frozen=True)
class Case:
    """One measured configuration; every rank runs the same cases in the same order."""

    transport: str
    preset: Preset
    mode: str
    dtype: str
    tokens: int
    num_sms: int | str | None = None
    """Bundled prefill only: the SM budget passed to the transport; None elsewhere."""

    @property
    def label(self) -> str:
        sms = "" if self.num_sms is None else f" sms={self.num_sms}"
        return f"{self.transport} {self.preset.name} {self.mode} {self.dtype} T={self.tokens}{sms}"


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Everything the ranks need to run the same benchmark (picklable for spawn)."""

    presets: tuple[Preset, ...]
    modes: tuple[str, ...]
    transports: tuple[str, ...]
    dtypes: tuple[str, ...]
    tokens: dict[str, tuple[int, ...]]
    headline_tokens: dict[str, int]
    """Per mode, the T of the digest's tables; prefill: the T of the SM sweep."""
    num_sms: tuple[int | str, ...]
    headline_num_sms: int | str
    """The bundled prefill SM budget of the T sweep."""
    iterations: dict[str, Iterations]
    graphs: bool
    """Decode on the GPU: also time CUDA-graph replays (1 call, and `graph_ops` calls each)."""
    graph_ops: int
    seed: int
    nvlink_mib: int

    def cases(self) -> list[Case]:
        """Every (preset, mode, transport, dtype, T) combination in run order; bundled
        prefill at every SM budget at the headline T, at the headline budget elsewhere."""
        out = []
        for preset in self.presets:
            for mode in self.modes:
                for transport in self.transports:
                    for dtype in self.dtypes:
                        out.extend(
                            Case(transport, preset, mode, dtype, t, num_sms)
                            for t in self.tokens[mode]
                            for num_sms in self._budgets(transport, mode, t)
                        )
        return out

    def _budgets(self, transport: str, mode: str, tokens: int) -> tuple[int | str | None, ...]:
        if transport != "bundled" or mode != PREFILL:
            return (None,)
        if tokens == self.headline_tokens[PREFILL]:
            return self.num_sms
        return (self.headline_num_sms,)
