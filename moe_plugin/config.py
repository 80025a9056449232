"""The plugin's settings, read from vLLM's `additional_config["moe_plugin"]`.

`vllm serve ... --additional-config '{"moe_plugin": {"mode": "auto"}}'` turns the plugin on;
without the `moe_plugin` key vLLM's own prepare/finalize choice stands. Every key is
optional:

- `mode`: `decode` (fixed-size, host-sync-free exchange, safe in CUDA graphs), `prefill`
  (expanded, exactly sized, one host read per call) or `auto` (per step: the decode path
  in steps vLLM runs under a CUDA graph, sized by the largest capture size, and the
  prefill path in eager steps).
- `transport`: `bundled` (our NVLink kernels, CUDA) or `torch` (torch.distributed).
- `max_tokens_per_rank`: tokens one rank may send per MoE call (the transport's buffers are
  sized for it; in `auto`, the prefill path's); default, and smallest value accepted:
  vLLM's `max_num_batched_tokens`.
- `num_sms`: SMs the bundled kernels may use (default: the transport's own, 24).
- `timeout_s`: bound on any wait for a peer (default: `MOE_PLUGIN_TIMEOUT_S`, 60 s).

A bad key or value raises ValueError at start-up naming the valid keys and values
(`check_engine_settings`, run by the plugin before vLLM builds its config), and so does
micro-batching (`--enable-dbo`, `--ubatch-size`) on the backend the plugin replaces, which
vLLM 0.32 and 0.33 refuse there on CUDA and turn off on CPU. No vLLM import here, so the
settings are testable anywhere.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from moe_plugin.transport import TRANSPORT_NAMES

CONFIG_KEY = "moe_plugin"
MODES = ("decode", "prefill", "auto")
REPLACED_ALL2ALL_BACKEND = "allgather_reducescatter"
"""The `--all2all-backend` whose layers the plugin takes over."""


@dataclasses.dataclass(frozen=True)
class PluginSettings:
    """Validated plugin settings; build with `parse` or `from_additional_config`."""

    mode: str = "auto"
    transport: str = "bundled"
    max_tokens_per_rank: int | None = None
    num_sms: int | None = None
    timeout_s: float | None = None

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> PluginSettings:
        """Settings from the `moe_plugin` mapping; ValueError on an unknown key or bad value."""
        if not isinstance(raw, Mapping):
            raise ValueError(
                f"additional_config['{CONFIG_KEY}'] must be a JSON object, "
                f"got {type(raw).__name__}; {_valid_keys_text()}"
            )
        unknown = sorted(set(raw) - set(_FIELD_NAMES))
        if unknown:
            raise ValueError(f"unknown {CONFIG_KEY} key(s) {unknown}; {_valid_keys_text()}")
        values = dict(raw)
        _check_choice(values, "mode", MODES)
        _check_choice(values, "transport", TRANSPORT_NAMES)
        _check_number(values, "max_tokens_per_rank", int, minimum=1)
        _check_number(values, "num_sms", int, minimum=1)
        _check_number(values, "timeout_s", float, minimum=0.0, exclusive=True)
        if values.get("num_sms") is not None and values.get("transport", "bundled") != "bundled":
            raise ValueError(
                f"{CONFIG_KEY}.num_sms applies to the bundled transport only, "
                f"but transport is {values['transport']!r}"
            )
        return cls(**values)

    @classmethod
    def from_additional_config(cls, additional_config: Any) -> PluginSettings | None:
        """Settings when `additional_config` (vLLM's, any type) holds the `moe_plugin` key,
        else None (the plugin stays off)."""
        if not isinstance(additional_config, Mapping) or CONFIG_KEY not in additional_config:
            return None
        return cls.parse(additional_config[CONFIG_KEY])

    def paths(self, cuda_graphs: bool) -> tuple[str, ...]:
        """The paths (`decode`, `prefill`) a layer builds: the one `mode` names, or for
        `auto` both when vLLM may run CUDA graphs and only `prefill` when it never does."""
        if self.mode != "auto":
            return (self.mode,)
        return ("decode", "prefill") if cuda_graphs else ("prefill",)

    def transport_kwargs(self, path: str) -> dict[str, Any]:
        """Keyword arguments for `make_transport` beyond the spec and group, for the
        transports of one path (decode or prefill; `auto` layers use one of each)."""
        kwargs: dict[str, Any] = {}
        if self.transport == "bundled":
            # Only that path's buffers, so each path's transport is sized for its own calls.
            kwargs["modes"] = (path,)
        if self.timeout_s is not None:
            kwargs["timeout_s"] = self.timeout_s
        if self.num_sms is not None:
            kwargs["num_sms"] = self.num_sms
        return kwargs


def check_engine_settings(
    additional_config: Any, *, micro_batching: bool, all2all_backend: str | None
) -> None:
    """Raise ValueError when vLLM's engine settings cannot run with the plugin: a malformed
    `moe_plugin` value (naming the valid keys), or micro-batching (DBO) on the backend the
    plugin replaces. Nothing is checked when the `moe_plugin` key is absent."""
    if PluginSettings.from_additional_config(additional_config) is None:
        return
    if micro_batching and all2all_backend == REPLACED_ALL2ALL_BACKEND:
        raise ValueError(
            f"{CONFIG_KEY} cannot run with --enable-dbo or --ubatch-size > 1: vLLM allows "
            "micro-batching only with its deepep_low_latency, deepep_high_throughput and "
            f"nixl_ep all2all backends, and the plugin serves --all2all-backend "
            f"{REPLACED_ALL2ALL_BACKEND} layers. Drop --enable-dbo (and --ubatch-size) to "
            f"use the plugin, or drop '{CONFIG_KEY}' from --additional-config to use "
            "those backends with DBO"
        )


_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(PluginSettings))
_VALUE_HELP = {
    "mode": " | ".join(MODES),
    "transport": " | ".join(TRANSPORT_NAMES),
    "max_tokens_per_rank": "integer >= 1",
    "num_sms": "integer >= 1 (bundled only)",
    "timeout_s": "number > 0",
}


def _valid_keys_text() -> str:
    return "valid keys: " + ", ".join(f"{k} ({_VALUE_HELP[k]})" for k in _FIELD_NAMES)


def _check_choice(values: dict[str, Any], key: str, choices: tuple[str, ...]) -> None:
    if key in values and values[key] not in choices:
        raise ValueError(f"{CONFIG_KEY}.{key} must be one of {list(choices)}, got {values[key]!r}")


def _check_number(
    values: dict[str, Any], key: str, kind: type, *, minimum: float, exclusive: bool = False
) -> None:
    """Accept an int (or, for float keys, any real number) within bounds; bools are not
    numbers here."""
    if key not in values:
        return
    value = values[key]
    allowed = (int,) if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, allowed):
        raise ValueError(f"{CONFIG_KEY}.{key} must be {_VALUE_HELP[key]}, got {value!r}")
    if value < minimum or (exclusive and value == minimum):
        raise ValueError(f"{CONFIG_KEY}.{key} must be {_VALUE_HELP[key]}, got {value!r}")
    values[key] = kind(value)
