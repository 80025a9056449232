"""Multi-process cases for the prepare/finalize classes inside vLLM's modular kernel.

Every rank builds the same small MoE layer (all experts' weights from one seed, its own
L = E / R experts in the kernel), runs cases through `FusedMoEKernel` or through direct
prepare / finalize calls, and compares its output with the dense single-process MoE
(`reference_moe`) on its own tokens. Workers return mismatch messages per scenario (empty
when right) instead of raising, so a rank that sees a mismatch still joins every later
collective. Module-level functions, so spawn can pickle them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import threading
from collections.abc import Callable, Iterator

import torch
import vllm.model_executor.layers.fused_moe.modular_kernel as mk
from vllm.model_executor.layers.fused_moe.activation import MoEActivation
from vllm.model_executor.layers.fused_moe.config import FusedMoEQuantConfig
from vllm.v1.worker import ubatching

from moe_plugin.demo.experts import (
    MATCH_TOLERANCE,
    ExpertParallelMoE,
    ReferenceExperts,
    relative_error,
)
from moe_plugin.prepare_finalize import (
    PREPARE_FINALIZE_CLASSES,
    TransportPrepareAndFinalize,
)
from moe_plugin.prepare_finalize.quant import activation_quant_config
from moe_plugin.transport import Transport, TransportPool, TransportSpec

FP8 = torch.float8_e4m3fn
NUM_EXPERTS = 16
HIDDEN = 256
INTERMEDIATE = 64
TMAX = 12
QUANTS = ("bf16", "fp8_block128", "fp8_block64", "fp8_deferred")
"""bf16 tokens; block-128 fp8 (quantized before dispatch, scales travel); block-64 fp8
(quantized after receive); block-128 fp8 config with experts that quantize their own
input (tokens travel in bf16, nothing quantized)."""


@dataclasses.dataclass(frozen=True)
class MoECase:
    """One call of the layer on every rank. `tokens[r]` tokens on rank r; `reduce`: the
    experts weight and sum themselves (else finalize does, and skipped slots hold NaN);
    `holes`: some choices are -1; `split`: the transport has split phases."""

    mode: str
    quant: str
    top_k: int
    tokens: tuple[int, ...]
    reduce: bool
    seed: int
    weight_on_input: bool = False
    holes: bool = False
    split: bool = True
    strided_empty: bool = False

    def __str__(self) -> str:
        flags = [
            f
            for f, on in (
                ("reduce", self.reduce),
                ("weight_on_input", self.weight_on_input),
                ("holes", self.holes),
                ("no_split", not self.split),
                ("strided_empty", self.strided_empty),
            )
            if on
        ]
        return (
            f"{self.mode}/{self.quant}/K={self.top_k}/tokens={list(self.tokens)}"
            f"/{'+'.join(flags) or 'plain'}"
        )


def kernel_cases(world_size: int, seed: int) -> list[MoECase]:
    """Both modes x every quantization x K in (1, 2, 8), zero-token ranks among them."""
    rng = random.Random(seed)
    cases = []
    for mode in ("decode", "prefill"):
        for qi, quant in enumerate(QUANTS):
            for top_k in (1, 2, 8):
                tokens = tuple(
                    0 if rng.random() < 0.25 else rng.randint(1, TMAX) for _ in range(world_size)
                )
                cases.append(
                    MoECase(
                        mode=mode,
                        quant=quant,
                        top_k=top_k,
                        tokens=tokens,
                        reduce=(qi + top_k) % 2 == 0,
                        seed=rng.randrange(1 << 30),
                        weight_on_input=top_k == 1 and qi % 2 == 0,
                        holes=top_k == 8,
                    )
                )
        cases.append(
            MoECase(
                mode=mode,
                quant="bf16",
                top_k=2,
                tokens=(0,) * world_size,
                reduce=False,
                seed=rng.randrange(1 << 30),
            )
        )
        # The idle ranks' hidden states are column slices (last-dim stride 2).
        for quant in ("bf16", "fp8_block128"):
            cases.append(
                MoECase(
                    mode=mode,
                    quant=quant,
                    top_k=2,
                    tokens=(TMAX,) + (0,) * (world_size - 1),
                    reduce=True,
                    seed=rng.randrange(1 << 30),
                    strided_empty=True,
                )
            )
        cases.append(
            MoECase(
                mode=mode,
                quant="fp8_block128",
                top_k=2,
                tokens=(TMAX,) * world_size,
                reduce=False,
                seed=rng.randrange(1 << 30),
                split=False,
            )
        )
    return cases


# ------------------------------------------------------------------ the layer
class Layer(ExpertParallelMoE):
    """This rank's share of the test MoE layer and the transports it uses."""

    def __init__(self, rank: int, world_size: int, seed: int) -> None:
        super().__init__(NUM_EXPERTS, HIDDEN, INTERMEDIATE, world_size, rank, seed)
        self.pools = {
            True: TransportPool("torch", timeout_s=120.0),
            False: no_split_pool("torch", timeout_s=120.0),
        }

    def build(
        self, case: MoECase
    ) -> tuple[TransportPrepareAndFinalize, ReferenceExperts, mk.FusedMoEKernel]:
        """(prepare/finalize, experts, kernel) for `case`; collective (transports)."""
        quant_config = quant_config_for(case.quant)
        spec = TransportSpec(
            max_tokens_per_rank=TMAX, hidden=HIDDEN, num_topk=case.top_k, num_experts=NUM_EXPERTS
        )
        pf = PREPARE_FINALIZE_CLASSES[case.mode](self.pools[case.split], spec, quant_config)
        kernel = self.kernel(
            pf,
            case.top_k,
            quant_config,
            reduce=case.reduce,
            invalid_fill=float("nan"),
            unquantized_inputs=case.quant == "fp8_deferred",
        )
        return pf, kernel.fused_experts, kernel


def no_split_pool(name: str, **kwargs: object) -> TransportPool:
    """A TransportPool whose transports report no split phases, so the modular kernel
    takes the synchronous prepare / finalize path."""
    pool = TransportPool(name, **kwargs)
    build = pool.get

    def get(spec: TransportSpec) -> Transport:
        transport = build(spec)
        transport.supports_split_phases = False
        return transport

    pool.get = get
    return pool


def quant_config_for(quant: str) -> FusedMoEQuantConfig:
    """vLLM's quant config for a QUANTS entry (weights stay bf16 in the test experts)."""
    return activation_quant_config({"bf16": None, "fp8_block64": 64}.get(quant, 128))


def rank_inputs(
    case: MoECase, rank: int, salt: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x [T, H] bf16, topk_ids [T, K] global (-1 holes when `case.holes`), weights);
    with `case.strided_empty`, an empty x is a column slice of a [0, 2H] tensor."""
    gen = torch.Generator().manual_seed(case.seed * 1009 + rank * 31 + salt)
    tokens = case.tokens[rank]
    x = torch.randn(tokens, HIDDEN, generator=gen).to(torch.bfloat16)
    if case.strided_empty and not tokens:
        x = torch.empty(0, 2 * HIDDEN, dtype=torch.bfloat16)[:, ::2]
    ids = (
        torch.stack(
            [torch.randperm(NUM_EXPERTS, generator=gen)[: case.top_k] for _ in range(tokens)]
        )
        if tokens
        else torch.empty(0, case.top_k, dtype=torch.int64)
    )
    if case.holes and tokens:
        ids[torch.rand(ids.shape, generator=gen) < 0.2] = -1
    weights = torch.rand(tokens, case.top_k, generator=gen)
    return x, ids, weights


def expected(
    layer: Layer, case: MoECase, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    quant = None if case.quant in ("bf16", "fp8_deferred") else quant_config_for(case.quant)
    return layer.reference(x, ids, weights, quant, case.weight_on_input)


def compare(out: torch.Tensor, ref: torch.Tensor, what: str) -> list[str]:
    if out.shape != ref.shape:
        return [f"{what}: output shape {list(out.shape)}, expected {list(ref.shape)}"]
    err = relative_error(out, ref)
    if not err <= MATCH_TOLERANCE:  # also catches NaN
        return [f"{what}: relative error {err:.4g} > {MATCH_TOLERANCE}"]
    return []


# ------------------------------------------------------------------- scenarios
def run_kernel_case(layer: Layer, case: MoECase) -> list[str]:
    """The whole layer through vLLM's FusedMoEKernel (async path when split)."""
    pf, _, kernel = layer.build(case)
    if pf.supports_async() != case.split:
        return [f"{case}: supports_async() is {pf.supports_async()}"]
    x, ids, weights = rank_inputs(case, layer.rank)
    out = layer.forward(kernel, x, ids, weights, case.weight_on_input)
    return compare(out, expected(layer, case, x, ids, weights), f"rank {layer.rank} {case}")


@contextlib.contextmanager
def micro_batch(ubatch_id: int) -> Iterator[None]:
    """Make vLLM's `dbo_current_ubatch_id()` return `ubatch_id` on this thread, as its
    micro-batch contexts do for the thread running that micro-batch."""
    ubatching._THREAD_ID_TO_CONTEXT[threading.get_ident()] = ubatch_id
    try:
        yield
    finally:
        del ubatching._THREAD_ID_TO_CONTEXT[threading.get_ident()]


def run_interleaved(layer: Layer, case: MoECase) -> list[str]:
    """Two micro-batches in flight at once: prepare 0, prepare 1, finalize 0, finalize 1,
    each under its DBO micro-batch id; with split phases every hook runs only after both
    sends (the (hook, receiver) protocol), else the synchronous calls."""
    pf, experts, _ = layer.build(case)
    batches = [rank_inputs(case, layer.rank, salt=u) for u in (0, 1)]
    receivers, outputs, finals = [], [], []
    errors: list[str] = []
    for u, (x, ids, weights) in enumerate(batches):
        with micro_batch(u):
            receivers.append(_start_prepare(pf, case, x, ids, weights))
    for u, (x, _, _) in enumerate(batches):
        with micro_batch(u):
            a1q, a1q_scale, meta, recv_ids, recv_weights = receivers[u]()
            errors += check_received(layer, case, meta, recv_ids, recv_weights)
            fused = _apply_experts(
                layer, experts, case, a1q, a1q_scale, meta, recv_ids, recv_weights
            )
            outputs.append(torch.empty_like(x))
            finals.append(
                _start_finalize(pf, case, outputs[u], fused, recv_ids, recv_weights, experts)
            )
    for u, (x, ids, weights) in enumerate(batches):
        with micro_batch(u):
            finals[u]()
        errors += compare(
            outputs[u],
            expected(layer, case, x, ids, weights),
            f"rank {layer.rank} micro-batch {u} {case}",
        )
    if pf.handles != [None, None]:
        errors.append(f"{case}: handles left after finalize: {pf.handles}")
    return errors


def _start_prepare(
    pf: TransportPrepareAndFinalize,
    case: MoECase,
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
) -> Callable[[], mk.PrepareResultType]:
    """Send; return a callable that receives (hook first, when there is one)."""
    args = (
        x,
        weights,
        ids,
        NUM_EXPERTS,
        None,
        case.weight_on_input,
        quant_config_for(case.quant),
        case.quant == "fp8_deferred",
    )
    if not case.split:
        result = pf.prepare(*args)
        return lambda: result
    hook, receiver = pf.prepare_async(*args)

    def receive() -> mk.PrepareResultType:
        hook()
        return receiver()

    return receive


def _start_finalize(
    pf: TransportPrepareAndFinalize,
    case: MoECase,
    output: torch.Tensor,
    fused: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    experts: ReferenceExperts,
) -> Callable[[], None]:
    """Send the rows back; return a callable that completes `output`."""
    args = (
        output,
        fused,
        weights,
        ids,
        case.weight_on_input,
        experts.finalize_weight_and_reduce_impl(),
    )
    if not case.split:
        pf.finalize(*args)
        return lambda: None
    hook, receiver = pf.finalize_async(*args)

    def finish() -> None:
        hook()
        receiver()

    return finish


def _apply_experts(
    layer: Layer,
    experts: ReferenceExperts,
    case: MoECase,
    a1q: torch.Tensor,
    a1q_scale: torch.Tensor | None,
    meta: mk.ExpertTokensMetadata | None,
    ids: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """The experts step as the modular kernel runs it (no call when nothing arrived)."""
    rows, hidden = a1q.shape
    if rows == 0:
        return torch.empty(0, hidden, dtype=torch.bfloat16)
    _, _, out_shape = experts.workspace_shapes(
        rows,
        layer.w1_local.shape[1],
        hidden,
        ids.shape[1],
        NUM_EXPERTS,
        layer.w1_local.shape[0],
        meta,
        MoEActivation.SILU,
    )
    out = torch.empty(out_shape, dtype=torch.bfloat16)
    empty = torch.empty(0)
    experts.apply(
        out,
        a1q,
        layer.w1_local,
        layer.w2_local,
        weights,
        ids,
        MoEActivation.SILU,
        NUM_EXPERTS,
        layer.expert_map,
        a1q_scale,
        None,
        empty,
        empty,
        meta,
        case.weight_on_input,
    )
    return out


def check_received(
    layer: Layer,
    case: MoECase,
    meta: mk.ExpertTokensMetadata | None,
    ids: torch.Tensor,
    weights: torch.Tensor,
) -> list[str]:
    """What prepare hands the experts: global ids of this rank's experts or -1, weight 0
    where the id is -1; decode: R * Tmax rows and no metadata; prefill: top-1 rows grouped
    by expert and per-expert counts that match them."""
    local = NUM_EXPERTS // layer.world_size
    first = layer.rank * local
    what = f"rank {layer.rank} {case}"
    errors = []
    valid = ids >= 0
    if bool(((ids < first) & valid).any() | (ids >= first + local).any()):
        errors.append(f"{what}: ids outside this rank's experts [{first}, {first + local})")
    if bool((weights[~valid] != 0).any()):
        errors.append(f"{what}: non-zero weight on an id of -1")
    if case.mode == "decode":
        if meta is not None or ids.shape != (layer.world_size * TMAX, case.top_k):
            errors.append(f"{what}: decode gave meta {meta} and ids {list(ids.shape)}")
        return errors
    counts = [int((ids[:, 0] == first + e).sum()) for e in range(local)]
    grouped = torch.repeat_interleave(torch.arange(first, first + local), torch.tensor(counts))
    if (
        meta is None
        or meta.expert_num_tokens_cpu.tolist() != counts
        or meta.expert_num_tokens.tolist() != counts
        or not torch.equal(ids[:, 0], grouped)
    ):
        errors.append(
            f"{what}: per-expert counts {meta and meta.expert_num_tokens_cpu} "
            f"do not describe the rows (expected {counts})"
        )
    return errors


def bad_input(layer: Layer) -> list[str]:
    """Local misuse raises before anything is sent (no collective involved)."""
    case = MoECase(
        mode="decode", quant="bf16", top_k=2, tokens=(2,) * layer.world_size, reduce=True, seed=5
    )
    pf, _, _ = layer.build(case)
    x, ids, weights = rank_inputs(case, layer.rank)
    quant = quant_config_for("bf16")
    attempts = {
        "router weight on input with top-2": (
            ValueError,
            lambda: pf.prepare(x, weights, ids, NUM_EXPERTS, None, True, quant),
        ),
        "fp16 activations": (
            ValueError,
            lambda: pf.prepare(x.half(), weights, ids, NUM_EXPERTS, None, False, quant),
        ),
        "wrong expert count": (
            ValueError,
            lambda: pf.prepare(x, weights, ids, NUM_EXPERTS * 2, None, False, quant),
        ),
        "finalize without prepare": (
            RuntimeError,
            lambda: pf.finalize(torch.empty_like(x), x, weights, ids, False, None),
        ),
    }
    errors = []
    for name, (kind, attempt) in attempts.items():
        try:
            attempt()
            errors.append(f"{name}: no error raised")
        except kind as exc:
            if not str(exc):
                errors.append(f"{name}: {kind.__name__} without a message")
    return errors


def run_all(rank: int, world_size: int, seed: int) -> dict[str, list[str]]:
    """Every scenario on this rank: {scenario: mismatch messages}."""
    layer = Layer(rank, world_size, seed)
    results = {"kernel": [], "interleaved": []}
    for case in kernel_cases(world_size, seed):
        results["kernel"] += run_kernel_case(layer, case)
    rng = random.Random(seed + 1)
    for mode in ("decode", "prefill"):
        for split, quant in ((True, "bf16"), (False, "fp8_block128"), (True, "fp8_block64")):
            tokens = tuple(rng.choice([0, 3, TMAX]) for _ in range(world_size))
            case = MoECase(
                mode=mode,
                quant=quant,
                top_k=rng.choice([1, 2, 8]),
                tokens=tokens,
                reduce=not split,
                seed=rng.randrange(1 << 30),
                split=split,
                holes=True,
            )
            results["interleaved"] += run_interleaved(layer, case)
    results["bad_input"] = bad_input(layer)
    return results
