"""Multi-process cases for `PerBatchPrepareAndFinalize` (mode `auto`) inside vLLM's
modular kernel, with vLLM's forward context set per step as its model runner sets it.

Every rank builds the layer of `tests/vllm_moe_cases.py` and one per-batch object per
configuration: a decode half sized for `GRAPH_TOKENS` tokens per rank (the largest CUDA-graph
capture size) and a prefill half for `STEP_TOKENS` (max_num_batched_tokens), over the torch
transport. Steps under CUDA-graph modes (PIECEWISE, FULL) must take the decode half and
eager steps (NONE) the prefill half, interleaved on the same object and on both DBO
micro-batch slots, each matching the dense MoE. Workers return {scenario: mismatch
messages}; module-level functions, so spawn can pickle them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import random
from collections.abc import Callable, Iterator
from typing import Any

import torch
from vllm.config import CUDAGraphMode, VllmConfig
from vllm.forward_context import set_forward_context

from moe_plugin.prepare_finalize import (
    PREPARE_FINALIZE_CLASSES,
    PerBatchPrepareAndFinalize,
)
from moe_plugin.transport import TransportSpec
from tests.vllm_moe_cases import (
    NUM_EXPERTS,
    QUANTS,
    TMAX,
    Layer,
    MoECase,
    _apply_experts,
    _start_finalize,
    _start_prepare,
    check_received,
    compare,
    expected,
    micro_batch,
    quant_config_for,
    rank_inputs,
)

GRAPH_TOKENS = TMAX
"""Decode half's tokens per rank (check_received expects R * TMAX decode rows)."""
STEP_TOKENS = 2 * TMAX
"""Prefill half's tokens per rank: eager steps may exceed the decode half."""
GRAPH_MODES = (CUDAGraphMode.PIECEWISE, CUDAGraphMode.FULL)
PATH_OF_MODE = {
    CUDAGraphMode.NONE: "prefill",
    CUDAGraphMode.PIECEWISE: "decode",
    CUDAGraphMode.FULL: "decode",
}


class Step:
    """vLLM's forward context for one step in `mode`, as its model runner sets it."""

    def __init__(self) -> None:
        self.vllm_config = VllmConfig()

    @contextlib.contextmanager
    def __call__(self, mode: CUDAGraphMode) -> Iterator[None]:
        with set_forward_context(None, self.vllm_config, cudagraph_runtime_mode=mode):
            yield


def build(layer: Layer, case: MoECase, with_decode: bool = True) -> PerBatchPrepareAndFinalize:
    """The per-batch prepare/finalize for `case` (collective: transports); `case.mode` is
    ignored."""
    quant_config = quant_config_for(case.quant)

    def half(path: str, tokens: int) -> Any:
        spec = TransportSpec(
            max_tokens_per_rank=tokens,
            hidden=layer.hidden,
            num_topk=case.top_k,
            num_experts=NUM_EXPERTS,
        )
        return PREPARE_FINALIZE_CLASSES[path](layer.pools[case.split], spec, quant_config)

    decode = half("decode", GRAPH_TOKENS) if with_decode else None
    return PerBatchPrepareAndFinalize(decode, half("prefill", STEP_TOKENS))


def kernel_for(layer: Layer, pf: PerBatchPrepareAndFinalize, config: MoECase) -> Any:
    """vLLM's FusedMoEKernel of `pf` and the test experts `config` asks for (experts that
    leave NaN in skipped slots when they do not reduce)."""
    return layer.kernel(
        pf,
        config.top_k,
        quant_config_for(config.quant),
        reduce=config.reduce,
        invalid_fill=float("nan"),
        unquantized_inputs=config.quant == "fp8_deferred",
    )


def record_paths(pf: PerBatchPrepareAndFinalize) -> list[str]:
    """A list that gets the path name of every half prepare the object runs from now on."""
    ran: list[str] = []

    def recorded(call: Callable[..., Any], path: str, *args: Any, **kwargs: Any) -> Any:
        ran.append(path)
        return call(*args, **kwargs)

    for path, half in pf.halves.items():
        if half is None:
            continue
        for name in ("prepare", "prepare_async"):
            setattr(half, name, functools.partial(recorded, getattr(half, name), path))
    return ran


def config_cases(world_size: int, seed: int) -> list[MoECase]:
    """One configuration per quantization x K in (1, 2, 8); `tokens` unused."""
    rng = random.Random(seed)
    cases = []
    for qi, quant in enumerate(QUANTS):
        for top_k in (1, 2, 8):
            cases.append(
                MoECase(
                    mode="auto",
                    quant=quant,
                    top_k=top_k,
                    tokens=(0,) * world_size,
                    reduce=(qi + top_k) % 2 == 0,
                    seed=rng.randrange(1 << 30),
                    weight_on_input=top_k == 1 and qi % 2 == 0,
                    holes=top_k == 8,
                    split=(qi + top_k) % 3 != 0,
                )
            )
    return cases


def step_modes(rng: random.Random) -> list[CUDAGraphMode]:
    """Eager and graph steps interleaved, each kind at least twice."""
    modes = [CUDAGraphMode.NONE, CUDAGraphMode.NONE, *GRAPH_MODES]
    modes += [rng.choice([CUDAGraphMode.NONE, *GRAPH_MODES]) for _ in range(2)]
    rng.shuffle(modes)
    return modes


def step_tokens(rng: random.Random, world_size: int, mode: CUDAGraphMode) -> tuple[int, ...]:
    """Tokens per rank for a step: up to the graph size under a graph, else up to the step
    size, with zero-token ranks."""
    bound = STEP_TOKENS if mode == CUDAGraphMode.NONE else GRAPH_TOKENS
    return tuple(0 if rng.random() < 0.2 else rng.randint(1, bound) for _ in range(world_size))


# ------------------------------------------------------------------- scenarios
def run_steps(layer: Layer, step: Step, config: MoECase, rng: random.Random) -> list[str]:
    """Steps of mixed modes through vLLM's FusedMoEKernel on one per-batch object."""
    pf = build(layer, config)
    kernel = kernel_for(layer, pf, config)
    ran = record_paths(pf)
    errors = []
    for i, mode in enumerate(step_modes(rng)):
        tokens = step_tokens(rng, layer.world_size, mode)
        case = dataclasses.replace(
            config, tokens=tokens, seed=config.seed + i, mode=PATH_OF_MODE[mode]
        )
        x, ids, weights = rank_inputs(case, layer.rank)
        with step(mode):
            out = layer.forward(kernel, x, ids, weights, case.weight_on_input)
        what = f"rank {layer.rank} step {i} {case}"
        errors += compare(out, expected(layer, case, x, ids, weights), what)
        if ran[-1:] != [PATH_OF_MODE[mode]]:
            errors.append(f"{what}: ran the {ran[-1:]} path, expected {PATH_OF_MODE[mode]}")
    errors += _left_in_flight(pf, str(config))
    return errors


def run_micro_batches(
    layer: Layer, step: Step, config: MoECase, modes: tuple[CUDAGraphMode, CUDAGraphMode]
) -> list[str]:
    """Two micro-batches in flight, slot u prepared under `modes[u]` and finalized under
    the other kind of step, so finalize must follow the path of its own dispatch; the
    experts must get that path's layout."""
    pf = build(layer, config)
    flipped = [CUDAGraphMode.NONE if m != CUDAGraphMode.NONE else GRAPH_MODES[0] for m in modes]
    rng = random.Random(config.seed)
    cases = [
        dataclasses.replace(
            config,
            tokens=step_tokens(rng, layer.world_size, modes[u]),
            mode=PATH_OF_MODE[modes[u]],
        )
        for u in (0, 1)
    ]
    batches = [rank_inputs(cases[u], layer.rank, salt=u) for u in (0, 1)]
    experts = kernel_for(layer, pf, config).fused_experts
    receivers, finals, outputs = [], [], []
    errors: list[str] = []
    for u, (x, ids, weights) in enumerate(batches):
        with micro_batch(u), step(modes[u]):
            receivers.append(_start_prepare(pf, cases[u], x, ids, weights))
    for u, (x, _, _) in enumerate(batches):
        with micro_batch(u), step(flipped[u]):
            a1q, a1q_scale, meta, recv_ids, recv_weights = receivers[u]()
            errors += check_received(layer, cases[u], meta, recv_ids, recv_weights)
            fused = _apply_experts(
                layer, experts, cases[u], a1q, a1q_scale, meta, recv_ids, recv_weights
            )
            outputs.append(torch.empty_like(x))
            finals.append(
                _start_finalize(pf, cases[u], outputs[u], fused, recv_ids, recv_weights, experts)
            )
    for u, (x, ids, weights) in enumerate(batches):
        with micro_batch(u), step(flipped[u]):
            finals[u]()
        errors += compare(
            outputs[u],
            expected(layer, cases[u], x, ids, weights),
            f"rank {layer.rank} micro-batch {u} {cases[u]}",
        )
    return errors + _left_in_flight(pf, f"{config} modes {[m.name for m in modes]}")


def _left_in_flight(pf: PerBatchPrepareAndFinalize, what: str) -> list[str]:
    left = [pf.dispatched] + [h.handles for h in pf.halves.values() if h is not None]
    if any(any(x is not None for x in slots) for slots in left):
        return [f"{what}: exchanges left in flight after finalize: {left}"]
    return []


def local_refusals(layer: Layer, step: Step) -> list[str]:
    """Misuse that each rank refuses before anything is sent (every rank makes the same
    call, so no collective is left waiting)."""
    config = MoECase(
        mode="auto", quant="bf16", top_k=2, tokens=(GRAPH_TOKENS + 1,) * layer.world_size,
        reduce=True, seed=7,
    )  # fmt: skip
    pf = build(layer, config)
    eager_only = build(layer, config, with_decode=False)
    x, ids, weights = rank_inputs(config, layer.rank)
    quant = quant_config_for("bf16")

    def prepare(target: PerBatchPrepareAndFinalize) -> None:
        target.prepare(x, weights, ids, NUM_EXPERTS, None, False, quant)

    attempts = {
        "graph step over the decode size": (
            ValueError,
            GRAPH_MODES[1],
            lambda: prepare(pf),
            f"holds {GRAPH_TOKENS} tokens per rank",
        ),
        "graph step without a decode half": (
            RuntimeError,
            GRAPH_MODES[0],
            lambda: prepare(eager_only),
            "built without the decode path",
        ),
        "finalize without prepare": (
            RuntimeError,
            CUDAGraphMode.NONE,
            lambda: pf.finalize(torch.empty_like(x), x, weights, ids, False, None),
            "without a prepare",
        ),
    }
    errors = []
    for name, (kind, mode, attempt, needle) in attempts.items():
        try:
            with step(mode):
                attempt()
            errors.append(f"rank {layer.rank} {name}: no error raised")
        except kind as exc:
            if needle not in str(exc):
                errors.append(f"rank {layer.rank} {name}: unclear message: {exc}")
    return errors


@contextlib.contextmanager
def debug_checks() -> Iterator[None]:
    """MOE_PLUGIN_DEBUG=1 on this rank for the duration."""
    before = os.environ.get("MOE_PLUGIN_DEBUG")
    os.environ["MOE_PLUGIN_DEBUG"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["MOE_PLUGIN_DEBUG"]
        else:
            os.environ["MOE_PLUGIN_DEBUG"] = before


def disagreement(layer: Layer, step: Step, forced_rank: int) -> list[str]:
    """With the debug check on: agreeing ranks run normally; then `forced_rank` steps under
    a CUDA graph while the others step eagerly, and every rank must raise an error naming
    both sides before anything is sent (then the layer still works)."""
    config = MoECase(
        mode="auto", quant="bf16", top_k=2, tokens=(3,) * layer.world_size, reduce=False,
        seed=11,
    )  # fmt: skip
    pf = build(layer, config)
    kernel = layer.kernel(pf, config.top_k, quant_config_for("bf16"), reduce=False)
    x, ids, weights = rank_inputs(config, layer.rank)
    want = expected(layer, config, x, ids, weights)
    others = [r for r in range(layer.world_size) if r != forced_rank]
    errors = []
    with debug_checks():
        with step(CUDAGraphMode.FULL):
            errors += compare(layer.forward(kernel, x, ids, weights), want, "agreeing ranks")
        mode = GRAPH_MODES[0] if layer.rank == forced_rank else CUDAGraphMode.NONE
        try:
            with step(mode):
                layer.forward(kernel, x, ids, weights)
            errors.append(f"rank {layer.rank}: disagreeing paths ran without an error")
        except RuntimeError as exc:
            for needle in (
                f"ranks {[forced_rank]} take the decode path",
                f"ranks {others} take the prefill path",
            ):
                if needle not in str(exc):
                    errors.append(f"rank {layer.rank}: {needle!r} not in the error: {exc}")
        if pf.dispatched != [None, None]:
            errors.append(f"rank {layer.rank}: a refused call left {pf.dispatched}")
        with step(CUDAGraphMode.NONE):
            errors += compare(layer.forward(kernel, x, ids, weights), want, "after the refusal")
    return errors


def run_all(rank: int, world_size: int, seed: int) -> dict[str, list[str]]:
    """Every scenario on this rank: {scenario: mismatch messages}."""
    layer = Layer(rank, world_size, seed)
    step = Step()
    rng = random.Random(seed)
    results: dict[str, list[str]] = {"steps": [], "micro_batches": []}
    configs = config_cases(world_size, seed)
    for config in configs:
        results["steps"] += run_steps(layer, step, config, rng)
    mode_pairs = [
        (CUDAGraphMode.PIECEWISE, CUDAGraphMode.NONE),
        (CUDAGraphMode.NONE, CUDAGraphMode.FULL),
        (CUDAGraphMode.FULL, CUDAGraphMode.PIECEWISE),
        (CUDAGraphMode.NONE, CUDAGraphMode.NONE),
    ]
    for i, config in enumerate(configs):
        results["micro_batches"] += run_micro_batches(
            layer, step, config, mode_pairs[i % len(mode_pairs)]
        )
    results["refusals"] = local_refusals(layer, step)
    results["disagreement"] = disagreement(layer, step, forced_rank=world_size - 1)
    return results
