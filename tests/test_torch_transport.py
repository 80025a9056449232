"""TorchTransport on 2 and 4 gloo processes against the single-process reference.

One spawn per group size runs every scenario (spawning is the slow part); each rank checks
what it received and what combine returned against `tests.reference`, collecting
mismatches instead of raising so that all ranks keep joining the same collectives.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable

import pytest
import torch

from moe_plugin.launch import run_workers
from moe_plugin.transport import DispatchResult, TransportSpec
from moe_plugin.transport.torch_transport import TorchTransport
from tests.reference import (
    Case,
    RankInputs,
    compare_combine,
    compare_dispatch,
    count_out_of_range,
    expected_combine,
    expected_pairs,
    expected_tokens,
    expert_output,
    make_inputs,
    random_case,
    to_global,
)

SEED = 20240611
TIMEOUT_S = 30.0


@dataclasses.dataclass(frozen=True)
class Mode:
    expand: bool
    cpu_sync: bool

    def __str__(self) -> str:
        return "expanded" if self.expand else f"tokens(cpu_sync={self.cpu_sync})"


MODES = (Mode(False, False), Mode(False, True), Mode(True, True))
Outcome = tuple[int, list[str]]
"""(cases run, mismatch messages) of one scenario on one rank."""


@dataclasses.dataclass
class Call:
    """One dispatch + combine on one rank, started and finished in separate steps."""

    transport: TorchTransport
    case: Case
    mode: Mode
    slot: int = 0
    alignment: int = 1
    hook: bool = False
    strided_empty: bool = False

    def __post_init__(self) -> None:
        self.inputs = make_inputs(self.case)
        self.rank = self.transport.rank
        self.what = (
            f"rank {self.rank} {self.case} {self.mode} slot={self.slot} "
            f"alignment={self.alignment} hook={self.hook} strided_empty={self.strided_empty}"
        )
        self.errors: list[str] = []
        self._receive: Callable[[], DispatchResult] | None = None
        self._combined: Callable[[], torch.Tensor] | None = None
        self.result: DispatchResult | None = None

    @property
    def mine(self) -> RankInputs:
        return self.inputs[self.rank]

    def start_dispatch(self) -> None:
        inp = _strided_if_empty(self.mine) if self.strided_empty else self.mine
        out = self.transport.dispatch(
            inp.x,
            inp.topk_idx,
            inp.topk_weights,
            x_scales=inp.x_scales,
            expand=self.mode.expand,
            cpu_sync=self.mode.cpu_sync,
            slot=self.slot,
            expert_alignment=self.alignment,
            return_recv_hook=self.hook,
        )
        self._receive = out if self.hook else (lambda: out)

    def finish_dispatch(self) -> None:
        assert self._receive is not None
        self.result = self._receive()
        if self.mode.expand:
            expected = expected_pairs(self.case, self.inputs, self.rank, self.alignment)
        else:
            expected = expected_tokens(self.case, self.inputs, self.rank)
        self.errors += compare_dispatch(self.result, expected, self.what)

    def start_combine(self) -> None:
        res = self.result
        assert res is not None
        ids = to_global(res.recv_topk_idx, self.rank, self.transport.num_local_experts)
        y = expert_output(res.recv_x, res.recv_scales, ids, res.recv_topk_weights)
        out = self.transport.combine(y, res.handle, slot=self.slot, return_recv_hook=self.hook)
        self._combined = out if self.hook else (lambda: out)

    def finish_combine(self) -> list[str]:
        assert self._combined is not None
        out = self._combined()
        expected = expected_combine(self.case, self.inputs, self.rank, self.mode.expand)
        self.errors += compare_combine(out, expected, self.what)
        return self.errors

    def run(self) -> list[str]:
        self.start_dispatch()
        self.finish_dispatch()
        self.start_combine()
        return self.finish_combine()


def _strided_if_empty(inp: RankInputs) -> RankInputs:
    """`inp` with each empty tensor replaced by a column slice of a twice-as-wide empty
    tensor: same shape, last-dim stride 2 (`is_contiguous()` still says True)."""

    def strided(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None or t.numel():
            return t
        return torch.zeros(t.shape[0], 2 * t.shape[1], dtype=t.dtype)[:, ::2]

    return RankInputs(
        x=strided(inp.x),
        x_scales=strided(inp.x_scales),
        topk_idx=strided(inp.topk_idx),
        topk_weights=strided(inp.topk_weights),
    )


def _transport(spec: TransportSpec) -> TorchTransport:
    return TorchTransport(spec, device="cpu", timeout_s=TIMEOUT_S)


def _fixed_case(
    world: int,
    *,
    topk: int,
    routing: str,
    tokens: tuple[int, ...],
    seed: int,
    dtype: torch.dtype = torch.bfloat16,
    tmax: int = 16,
) -> Case:
    """H = 128, four experts per rank."""
    spec = TransportSpec(
        max_tokens_per_rank=tmax, hidden=128, num_topk=topk, num_experts=4 * world, dtype=dtype
    )
    return Case(spec=spec, world_size=world, tokens=tokens, routing=routing, seed=seed)


def _alignment(rng: random.Random, mode: Mode) -> int:
    return rng.choice([1, 1, 4, 16]) if mode.expand else 1


# ----------------------------------------------------------------- scenarios
def scenario_grid(rank: int, world: int, rng: random.Random) -> Outcome:
    """Every K in {1, 2, 8, 32} x payload x mode, with random shapes, token counts (some
    ranks idle), routing, alignment, hooks and slot; three rounds."""
    errors: list[str] = []
    cases = 0
    for _ in range(3):
        for topk in (1, 2, 8, 32):
            for dtype in (torch.bfloat16, torch.float8_e4m3fn):
                for mode in MODES:
                    case = random_case(rng, world, topk=topk, dtype=dtype)
                    call = Call(
                        _transport(case.spec),
                        case,
                        mode,
                        slot=rng.randrange(2),
                        alignment=_alignment(rng, mode),
                        hook=rng.random() < 0.5,
                    )
                    errors += call.run()
                    cases += 1
    return cases, errors


def scenario_larger(rank: int, world: int, rng: random.Random) -> Outcome:
    """Larger shapes (Tmax 96, H 1024, 16 experts per rank, K 8), every mode and payload."""
    errors: list[str] = []
    cases = 0
    for dtype in (torch.bfloat16, torch.float8_e4m3fn):
        for mode in MODES:
            spec = TransportSpec(
                max_tokens_per_rank=96, hidden=1024, num_topk=8, num_experts=16 * world, dtype=dtype
            )
            tokens = tuple(rng.randint(0, 96) for _ in range(world))
            case = Case(
                spec=spec,
                world_size=world,
                tokens=tokens,
                routing="uniform",
                seed=rng.randrange(1 << 30),
            )
            errors += Call(
                _transport(spec),
                case,
                mode,
                slot=rng.randrange(2),
                alignment=_alignment(rng, mode),
                hook=rng.random() < 0.5,
            ).run()
            cases += 1
    return cases, errors


def scenario_skewed(rank: int, world: int, rng: random.Random) -> Outcome:
    """Every token to one expert, only to one rank's experts, or to no expert at all."""
    errors: list[str] = []
    cases = 0
    for routing in ("one_expert", "one_rank", "none"):
        for topk in (2, 8):
            for mode in MODES:
                case = _fixed_case(
                    world,
                    topk=topk,
                    routing=routing,
                    tokens=(16,) * world,
                    seed=rng.randrange(1 << 30),
                )
                errors += Call(
                    _transport(case.spec), case, mode, alignment=_alignment(rng, mode)
                ).run()
                cases += 1
    return cases, errors


def _zero_token_calls(world: int, rng: random.Random, strided_empty: bool) -> Outcome:
    """T = 0 on every rank, on all but one rank, and on one rank, in every mode and payload,
    with and without hooks; with `strided_empty`, empty inputs are strided views."""
    errors: list[str] = []
    cases = 0
    layouts = [(0,) * world, (5,) + (0,) * (world - 1), (7,) * (world - 1) + (0,)]
    for tokens in layouts:
        for dtype in (torch.bfloat16, torch.float8_e4m3fn):
            for mode in MODES:
                for hook in (False, True):
                    case = _fixed_case(
                        world,
                        topk=4,
                        routing="uniform",
                        tokens=tokens,
                        dtype=dtype,
                        seed=rng.randrange(1 << 30),
                        tmax=8,
                    )
                    errors += Call(
                        _transport(case.spec),
                        case,
                        mode,
                        hook=hook,
                        alignment=_alignment(rng, mode),
                        strided_empty=strided_empty,
                    ).run()
                    cases += 1
    return cases, errors


def scenario_zero_tokens(rank: int, world: int, rng: random.Random) -> Outcome:
    """Idle ranks (see `_zero_token_calls`) with dense empty inputs."""
    return _zero_token_calls(world, rng, strided_empty=False)


def scenario_zero_tokens_strided(rank: int, world: int, rng: random.Random) -> Outcome:
    """Idle ranks whose empty inputs are column slices (last-dim stride 2)."""
    return _zero_token_calls(world, rng, strided_empty=True)


def scenario_slots(rank: int, world: int, rng: random.Random) -> Outcome:
    """Two micro-batches in flight on one transport: dispatch slot 0, dispatch slot 1,
    combine slot 0, combine slot 1 (finishing slot 1 first), with and without hooks, in
    equal and mixed modes."""
    errors: list[str] = []
    cases = 0
    pairs = [(MODES[0], MODES[0]), (MODES[2], MODES[2]), (MODES[2], MODES[0]), (MODES[1], MODES[2])]
    for mode0, mode1 in pairs:
        for hook in (False, True):
            for dtype in (torch.bfloat16, torch.float8_e4m3fn):
                first = random_case(rng, world, dtype=dtype, routing="uniform")
                second = dataclasses.replace(
                    first,
                    seed=rng.randrange(1 << 30),
                    tokens=tuple(
                        rng.randint(0, first.spec.max_tokens_per_rank) for _ in range(world)
                    ),
                )
                transport = _transport(first.spec)
                calls = [
                    Call(
                        transport, first, mode0, slot=0, hook=hook, alignment=_alignment(rng, mode0)
                    ),
                    Call(
                        transport,
                        second,
                        mode1,
                        slot=1,
                        hook=hook,
                        alignment=_alignment(rng, mode1),
                    ),
                ]
                for call in calls:
                    call.start_dispatch()
                for call in calls:
                    call.finish_dispatch()
                for call in calls:
                    call.start_combine()
                for call in reversed(calls):
                    errors += call.finish_combine()
                cases += 2
    return cases, errors


def scenario_out_of_range(rank: int, world: int, rng: random.Random) -> Outcome:
    """Ids outside [-1, E) are treated as -1, counted per rank, and make check() raise."""
    errors: list[str] = []
    cases = 0
    for mode in MODES:
        for hook in (False, True):
            case = _fixed_case(
                world,
                topk=8,
                routing="out_of_range",
                tokens=(12,) * world,
                seed=rng.randrange(1 << 30),
            )
            transport = _transport(case.spec)
            call = Call(transport, case, mode, hook=hook, alignment=_alignment(rng, mode))
            errors += call.run()
            cases += 1
            bad = count_out_of_range(call.mine, case.spec.num_experts)
            dropped = int(transport.dropped_ids.item())
            if bad == 0:
                errors.append(f"rank {rank}: the case generated no out-of-range ids")
            if dropped != bad:
                errors.append(f"rank {rank} {mode}: dropped_ids={dropped}, expected {bad}")
            try:
                transport.check()
                errors.append(f"rank {rank} {mode}: check() did not raise after {bad} drops")
            except RuntimeError as err:
                if f"{bad} expert ids" not in str(err):
                    errors.append(f"rank {rank}: check() message lacks the count: {err}")
    return cases, errors


SCENARIOS: dict[str, Callable[[int, int, random.Random], Outcome]] = {
    "grid": scenario_grid,
    "larger": scenario_larger,
    "skewed": scenario_skewed,
    "zero_tokens": scenario_zero_tokens,
    "zero_tokens_strided": scenario_zero_tokens_strided,
    "slots": scenario_slots,
    "out_of_range": scenario_out_of_range,
}


def run_scenarios(rank: int, world: int, seed: int) -> dict[str, Outcome]:
    """Worker: every scenario in order, each from its own seeded generator (the same on
    every rank, so all ranks make the same calls)."""
    torch.set_num_threads(1)
    outcomes = {}
    for index, (name, scenario) in enumerate(SCENARIOS.items()):
        outcomes[name] = scenario(rank, world, random.Random(seed * 31 + index))
    return outcomes


def wait_for_absent_peer(rank: int, world: int, timeout_s: float) -> list[str]:
    """Worker: rank 0 dispatches (non-expanded, then expanded) while rank 1 never joins;
    returns rank 0's errors, which must be bounded by `timeout_s`."""
    transport = TorchTransport(TransportSpec(4, 8, 1, 2 * world), device="cpu", timeout_s=timeout_s)
    if rank != 0:
        time.sleep(3 * timeout_s + 2)
        return []
    outcomes = []
    for expand in (False, True):
        start = time.monotonic()
        try:
            transport.dispatch(
                torch.zeros(1, 8, dtype=torch.bfloat16),
                torch.zeros(1, 1, dtype=torch.int64),
                torch.ones(1, 1),
                expand=expand,
                cpu_sync=expand,
            )
            outcomes.append("no error")
        except TimeoutError as err:
            outcomes.append(f"{time.monotonic() - start:.1f} s: {err}")
    return outcomes


# --------------------------------------------------------------------- tests
@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"{n}ranks")
def outcomes(request: pytest.FixtureRequest) -> list[dict[str, Outcome]]:
    return run_workers(
        run_scenarios, request.param, SEED + request.param, backend="gloo", timeout_s=240
    )


def _assert_clean(outcomes: list[dict[str, Outcome]], name: str) -> None:
    for rank, by_name in enumerate(outcomes):
        cases, errors = by_name[name]
        assert cases > 0, f"rank {rank} ran no {name} cases"
        assert not errors, f"{len(errors)} mismatches on rank {rank}:\n" + "\n".join(errors[:8])


@pytest.mark.timeout(300)
def test_random_grid_matches_reference(outcomes: list[dict[str, Outcome]]) -> None:
    _assert_clean(outcomes, "grid")


@pytest.mark.timeout(300)
def test_larger_shapes(outcomes: list[dict[str, Outcome]]) -> None:
    _assert_clean(outcomes, "larger")


@pytest.mark.timeout(300)
def test_skewed_routing(outcomes: list[dict[str, Outcome]]) -> None:
    _assert_clean(outcomes, "skewed")


@pytest.mark.timeout(300)
def test_zero_token_ranks(outcomes: list[dict[str, Outcome]]) -> None:
    _assert_clean(outcomes, "zero_tokens")


@pytest.mark.timeout(300)
def test_zero_token_ranks_with_strided_inputs(outcomes: list[dict[str, Outcome]]) -> None:
    _assert_clean(outcomes, "zero_tokens_strided")


@pytest.mark.timeout(300)
def test_two_slots_interleaved(outcomes: list[dict[str, Outcome]]) -> None:
    _assert_clean(outcomes, "slots")


@pytest.mark.timeout(300)
def test_out_of_range_ids_dropped_and_counted(outcomes: list[dict[str, Outcome]]) -> None:
    _assert_clean(outcomes, "out_of_range")


@pytest.mark.timeout(120)
def test_wait_for_absent_peer_is_bounded() -> None:
    timeout_s = 2.0
    errors = run_workers(wait_for_absent_peer, 2, timeout_s, backend="gloo", timeout_s=100)[0]
    assert len(errors) == 2
    for err in errors:
        assert "rank 0 of 2" in err and "within 2 s" in err, err
        assert float(err.split(" s:")[0]) < timeout_s + 5, err
