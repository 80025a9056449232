"""The plugin inside a fresh vLLM process (spawned, so vLLM's factory module is not yet
imported when `register()` runs). Module-level functions, so spawn can pickle them; each
returns {check: error messages}."""

from __future__ import annotations

import sys
from types import ModuleType, SimpleNamespace
from typing import Any

import torch

FACTORY_MODULE = "vllm.model_executor.layers.fused_moe.all2all_utils"
USER_MODULE = "vllm.model_executor.layers.fused_moe.oracle.unquantized"


def plugin_checks(rank: int, world_size: int) -> dict[str, list[str]]:
    import moe_plugin.vllm_plugin as plugin

    results = {"register": check_register(plugin), "startup": check_startup(plugin)}
    results.update(check_selection(plugin))
    results["experts"] = check_experts(plugin)
    return results


def check_register(plugin: ModuleType) -> list[str]:
    """Patched on first import (hook), idempotent, and rebound where already imported."""
    import importlib

    errors = []
    if FACTORY_MODULE in sys.modules:
        errors.append(
            "vLLM's factory module was imported before register(): the import-hook path is untested"
        )
    plugin.register()
    plugin.register()
    factory_module = importlib.import_module(FACTORY_MODULE)
    user_module = importlib.import_module(USER_MODULE)
    wrapper = vars(factory_module)[plugin.FACTORY_NAME]
    original = getattr(wrapper, plugin._WRAPPED, None)
    if original is None:
        return errors + ["the factory is not wrapped after its module was imported"]
    if getattr(original, plugin._WRAPPED, None) is not None:
        errors.append("register() twice wrapped the factory twice")
    if vars(user_module)[plugin.FACTORY_NAME] is not wrapper:
        errors.append(f"{USER_MODULE} imported the unwrapped factory")
    plugin.register()
    if vars(factory_module)[plugin.FACTORY_NAME] is not wrapper:
        errors.append("a third register() replaced the wrapper")

    # The already-imported path: put vLLM's original back everywhere, register again.
    holders = _modules_holding(wrapper, plugin.FACTORY_NAME)
    for module in holders:
        vars(module)[plugin.FACTORY_NAME] = original
    plugin.register()
    rewrapped = vars(factory_module)[plugin.FACTORY_NAME]
    if getattr(rewrapped, plugin._WRAPPED, None) is not original:
        errors.append("register() did not wrap an already-imported factory")
    left = [m.__name__ for m in _modules_holding(original, plugin.FACTORY_NAME)]
    if left:
        errors.append(f"modules still bound to vLLM's original factory: {left}")
    if len(holders) < 2:
        errors.append(
            f"expected the factory bound in several vllm modules, found "
            f"{[m.__name__ for m in holders]}"
        )
    return errors


def check_startup(plugin: ModuleType) -> list[str]:
    """`EngineArgs.create_engine_config`, which `vllm serve` and an offline `LLM` call to
    build vLLM's config before any engine process starts, refuses a malformed `moe_plugin`
    value and DBO on the replaced backend with the plugin's messages, and lets everything
    else through to vLLM (here to its error about the missing model). Patched on import
    (register() ran before the module was imported) and, after being put back, again."""
    import importlib

    errors = []
    if plugin.ENGINE_ARGS_MODULE in sys.modules:
        errors.append("EngineArgs was imported before register(): the import hook is untested")
    engine_args = importlib.import_module(plugin.ENGINE_ARGS_MODULE).EngineArgs
    original = getattr(engine_args.create_engine_config, plugin._WRAPPED, None)
    if original is None:
        return errors + ["EngineArgs.create_engine_config is not wrapped after import"]
    engine_args.create_engine_config = original
    plugin.register()
    if getattr(engine_args.create_engine_config, plugin._WRAPPED, None) is not original:
        errors.append("register() did not wrap an already-imported EngineArgs")

    def startup_error(**kwargs: Any) -> str:
        try:
            engine_args(model="/nonexistent/model", **kwargs).create_engine_config()
        except Exception as exc:  # noqa: BLE001 - any error is the outcome looked at
            return f"{type(exc).__name__}: {exc}"
        return "no error"

    dbo = {"enable_dbo": True, "enable_expert_parallel": True}
    expect = {
        "unknown key": (
            {"additional_config": {"moe_plugin": {"modee": "decode"}}},
            "ValueError: unknown moe_plugin key(s) ['modee']; valid keys: mode",
        ),
        "not an object": (
            {"additional_config": {"moe_plugin": "decode"}},
            "must be a JSON object",
        ),
        "dbo on the replaced backend": (
            {
                **dbo,
                "all2all_backend": "allgather_reducescatter",
                "additional_config": {"moe_plugin": {}},
            },
            "moe_plugin cannot run with --enable-dbo",
        ),
        "micro-batches by size": (
            {
                "ubatch_size": 2,
                "all2all_backend": "allgather_reducescatter",
                "additional_config": {"moe_plugin": {}},
            },
            "moe_plugin cannot run with --enable-dbo",
        ),
    }
    for name, (kwargs, needle) in expect.items():
        got = startup_error(**kwargs)
        if needle not in got:
            errors.append(f"{name}: expected {needle!r}, got {got[:300]!r}")
    passed = {
        "valid settings": {"additional_config": {"moe_plugin": {"transport": "torch"}}},
        "dbo without the plugin": {**dbo, "all2all_backend": "allgather_reducescatter"},
        "dbo on a backend the plugin leaves alone": {
            **dbo,
            "all2all_backend": "deepep_high_throughput",
            "additional_config": {"moe_plugin": {}},
        },
    }
    for name, kwargs in passed.items():
        got = startup_error(**kwargs)
        if "moe_plugin" in got or "/nonexistent/model" not in got:
            errors.append(f"{name}: expected vLLM's missing-model error, got {got[:300]!r}")
    return errors


def check_selection(plugin: ModuleType) -> dict[str, list[str]]:
    """With the flag our classes are built (mode by mode), without it vLLM's stand."""
    import importlib

    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed.parallel_state import (
        init_distributed_environment,
        initialize_model_parallel,
    )
    from vllm.model_executor.layers.fused_moe.config import FusedMoEQuantConfig

    from moe_plugin.demo.experts import expert_parallel_moe_config

    factory = vars(importlib.import_module(FACTORY_MODULE))[plugin.FACTORY_NAME]
    quant = FusedMoEQuantConfig.make()
    ep_layer = expert_parallel_moe_config(16, 2, 256, 64, world_size=2, rank=0)
    # vLLM's own naive prepare/finalize reads only world_size from its all2all manager.
    manager = SimpleNamespace(world_size=2)

    def chosen(
        additional_config: dict[str, Any], moe: Any = ep_layer, new_interface: bool = True
    ) -> str:
        with set_current_vllm_config(VllmConfig(additional_config=additional_config)):
            pf = factory(moe, quant, allow_new_interface=new_interface, all2all_manager=manager)
        return type(pf).__name__

    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo")
        initialize_model_parallel(1, 1)

    on = {"transport": "torch"}
    expect = {
        "decode flag": ({"moe_plugin": {**on, "mode": "decode"}}, "DecodePrepareAndFinalize"),
        "prefill flag": ({"moe_plugin": {**on, "mode": "prefill"}}, "PrefillPrepareAndFinalize"),
        # No model config here, so no CUDA graphs: auto builds its prefill path only.
        "auto flag, eager": ({"moe_plugin": on}, "PerBatchPrepareAndFinalize"),
        "no flag": ({}, "MoEPrepareAndFinalizeNaiveDPEPModular"),
        "other additional_config keys": (
            {"something_else": 1},
            "MoEPrepareAndFinalizeNaiveDPEPModular",
        ),
    }
    selection = []
    for name, (config, want) in expect.items():
        got = chosen(config)
        if got != want:
            selection.append(f"{name}: built {got}, expected {want}")
    got = chosen({"moe_plugin": on}, new_interface=False)
    if got != "NoneType":
        selection.append(f"a caller without the modular interface got {got}")
    single = expert_parallel_moe_config(16, 2, 256, 64, world_size=1, rank=0)
    got = chosen({"moe_plugin": on}, single)
    if got.startswith(("Decode", "Prefill", "PerBatch")):
        selection.append(f"a layer without expert-parallel all2all got {got}")

    auto = []
    capture_sizes = [1, 2, 4, 8, 16, 24]

    def with_graphs(settings: dict[str, Any]) -> Any:
        return SimpleNamespace(
            additional_config={"moe_plugin": settings},
            model_config=SimpleNamespace(enforce_eager=False),
            compilation_config=SimpleNamespace(
                cudagraph_mode=SimpleNamespace(name="FULL"),
                max_cudagraph_capture_size=capture_sizes[-1],
                cudagraph_capture_sizes=capture_sizes,
            ),
        )

    graphs = with_graphs(on)
    pf = plugin.make_prepare_finalize(ep_layer, quant, vllm_config=graphs)
    sizes = {path: half and half.spec.max_tokens_per_rank for path, half in pf.halves.items()}
    want = {"decode": capture_sizes[-1], "prefill": ep_layer.max_num_tokens}
    if type(pf).__name__ != "PerBatchPrepareAndFinalize" or sizes != want:
        auto.append(
            f"auto with CUDA graphs built {type(pf).__name__} with paths sized {sizes} "
            f"tokens per rank, expected {want} (largest capture size, max_num_tokens)"
        )
    no_graphs = SimpleNamespace(
        additional_config={"moe_plugin": on}, model_config=None, compilation_config=None
    )
    eager = plugin.make_prepare_finalize(ep_layer, quant, vllm_config=no_graphs)
    if eager.halves["decode"] is not None:
        auto.append("auto without CUDA graphs built a decode path")
    explicit = plugin.make_prepare_finalize(
        ep_layer, quant, vllm_config=with_graphs({**on, "mode": "decode"})
    )
    if explicit.spec.max_tokens_per_rank != ep_layer.max_num_tokens:
        auto.append(
            f"mode decode sized for {explicit.spec.max_tokens_per_rank} tokens, the "
            f"layer's max_num_tokens is {ep_layer.max_num_tokens}"
        )

    def sized_for(tokens: int) -> Any:
        return plugin.make_prepare_finalize(
            ep_layer,
            quant,
            vllm_config=SimpleNamespace(
                additional_config={"moe_plugin": {**on, "max_tokens_per_rank": tokens}},
                model_config=None,
                compilation_config=None,
            ),
        )

    bigger = ep_layer.max_num_tokens + 64
    sized = sized_for(bigger).halves["prefill"]
    if sized.spec.max_tokens_per_rank != bigger or sized.pool is not pf.halves["prefill"].pool:
        auto.append("max_tokens_per_rank not honored, or the transport pool not shared")
    try:
        sized_for(ep_layer.max_num_tokens - 1)
        auto.append("max_tokens_per_rank below max_num_batched_tokens accepted")
    except ValueError as exc:
        if "--max-num-batched-tokens" not in str(exc):
            auto.append(f"undersized max_tokens_per_rank message unclear: {exc}")

    errors = []
    try:
        chosen({"moe_plugin": {"mode": "fast"}})
        errors.append("mode 'fast' accepted")
    except ValueError as exc:
        if "decode" not in str(exc):
            errors.append(f"bad mode message does not list the modes: {exc}")
    wrong_backend = expert_parallel_moe_config(16, 2, 256, 64, world_size=2, rank=0)
    wrong_backend.moe_parallel_config.all2all_backend = "deepep_low_latency"
    if plugin.make_prepare_finalize(wrong_backend, quant, vllm_config=graphs) is not None:
        errors.append("took over a layer on the deepep_low_latency backend")
    round_robin = SimpleNamespace(
        **vars(graphs), parallel_config=SimpleNamespace(expert_placement_strategy="round_robin")
    )
    if plugin.make_prepare_finalize(ep_layer, quant, vllm_config=round_robin) is not None:
        errors.append("took over a layer with round-robin expert placement")
    fp16 = expert_parallel_moe_config(16, 2, 256, 64, world_size=2, rank=0)
    fp16.in_dtype = torch.float16
    if plugin.make_prepare_finalize(fp16, quant, vllm_config=graphs) is not None:
        errors.append("took over a float16 layer")
    return {"selection": selection, "auto": auto, "refusals": errors}


def _modules_holding(value: object, name: str) -> list[ModuleType]:
    holders = []
    for module_name, module in list(sys.modules.items()):
        if (
            module_name.startswith("vllm")
            and isinstance(module, ModuleType)
            and vars(module).get(name) is value
        ):
            holders.append(module)
    return holders


def check_experts(plugin: ModuleType) -> list[str]:
    """vLLM's own kernel assembly (`make_unquantized_moe_kernel`) with the plugin on: the
    experts vLLM picks on this CPU platform are refused with a ValueError naming them,
    and `ReferenceExperts` are served by our prepare/finalize. Needs `check_selection`'s
    process group."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.fused_moe.config import FusedMoEQuantConfig
    from vllm.model_executor.layers.fused_moe.oracle.unquantized import (
        make_unquantized_moe_kernel,
        select_unquantized_moe_backend,
    )

    from moe_plugin.demo.experts import ReferenceExperts, expert_parallel_moe_config

    moe = expert_parallel_moe_config(16, 2, 256, 64, world_size=2, rank=0)
    backend, vllm_experts = select_unquantized_moe_backend(moe)
    quant = FusedMoEQuantConfig.make()

    def assemble(additional_config: dict[str, Any], experts_cls: type) -> Any:
        with set_current_vllm_config(VllmConfig(additional_config=additional_config)):
            return make_unquantized_moe_kernel(
                quant_config=quant, moe_config=moe, backend=backend, experts_cls=experts_cls
            )

    on = {"moe_plugin": {"transport": "torch", "mode": "decode"}}
    errors = []
    if vllm_experts is None:
        return [f"vLLM selected no experts class for backend {backend}"]
    try:
        kernel = assemble(on, vllm_experts)
        errors.append(
            f"{vllm_experts.__name__} assembled with {type(kernel.prepare_finalize).__name__}"
        )
    except ValueError as exc:
        if vllm_experts.__name__ not in str(exc) or "expert_map" not in str(exc):
            errors.append(f"refusal does not name the experts class: {exc}")
    kernel = assemble(on, ReferenceExperts)
    if type(kernel.prepare_finalize).__name__ != "DecodePrepareAndFinalize":
        errors.append(f"ReferenceExperts got {type(kernel.prepare_finalize).__name__}")
    return errors
