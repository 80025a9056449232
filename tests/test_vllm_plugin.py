"""The vLLM plugin: registration (import hook, idempotence, rebinding), which
prepare/finalize a layer gets with and without `additional_config["moe_plugin"]`, the
settings' validation, and the version gate."""

from __future__ import annotations

import pytest

from moe_plugin.config import MODES, PluginSettings

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def checks() -> dict[str, list[str]]:
    pytest.importorskip("vllm")
    from moe_plugin.launch import run_workers
    from tests.vllm_plugin_cases import plugin_checks

    return run_workers(plugin_checks, 1, backend="gloo", timeout_s=220)[0]


@pytest.mark.parametrize(
    "check", ["register", "startup", "selection", "auto", "refusals", "experts"]
)
def test_plugin_in_vllm(checks: dict[str, list[str]], check: str) -> None:
    assert not checks[check], "\n".join(checks[check])


def test_settings_defaults_and_modes() -> None:
    assert PluginSettings.from_additional_config(None) is None
    assert PluginSettings.from_additional_config({"other": 1}) is None
    settings = PluginSettings.from_additional_config({"moe_plugin": {}})
    assert settings == PluginSettings()
    assert settings.paths(cuda_graphs=True) == ("decode", "prefill")
    assert settings.paths(cuda_graphs=False) == ("prefill",)
    for mode in ("decode", "prefill"):
        for graphs in (True, False):
            assert PluginSettings.parse({"mode": mode}).paths(cuda_graphs=graphs) == (mode,)
    full = PluginSettings.parse(
        {
            "mode": "decode",
            "transport": "bundled",
            "max_tokens_per_rank": 512,
            "num_sms": 16,
            "timeout_s": 5,
        }
    )
    assert full.transport_kwargs("decode") == {
        "modes": ("decode",),
        "timeout_s": 5.0,
        "num_sms": 16,
    }
    torch_settings = PluginSettings.parse({"transport": "torch", "timeout_s": 5})
    assert torch_settings.transport_kwargs("prefill") == {"timeout_s": 5.0}
    assert isinstance(full.timeout_s, float)


@pytest.mark.parametrize(
    "raw, needle",
    [
        ({"modee": "decode"}, "unknown moe_plugin key(s) ['modee']; valid keys: mode"),
        ({"mode": "fast"}, "moe_plugin.mode must be one of ['decode', 'prefill', 'auto']"),
        ({"transport": "nccl"}, "moe_plugin.transport must be one of"),
        ({"max_tokens_per_rank": 0}, "moe_plugin.max_tokens_per_rank must be integer >= 1"),
        ({"max_tokens_per_rank": "64"}, "got '64'"),
        ({"max_tokens_per_rank": True}, "got True"),
        ({"num_sms": 8, "transport": "torch"}, "num_sms applies to the bundled transport"),
        ({"timeout_s": 0}, "moe_plugin.timeout_s must be number > 0"),
    ],
)
def test_bad_settings_name_the_valid_ones(raw: dict, needle: str) -> None:
    with pytest.raises(ValueError) as info:
        PluginSettings.parse(raw)
    assert needle in str(info.value)


def test_settings_must_be_an_object() -> None:
    with pytest.raises(ValueError, match="must be a JSON object.*valid keys: mode"):
        PluginSettings.from_additional_config({"moe_plugin": "decode"})
    assert MODES == ("decode", "prefill", "auto")


@pytest.mark.parametrize(
    "version, ok",
    [
        ("0.31.2", False),
        ("0.32.0", True),
        ("0.32.1.dev5+gabc123", True),
        ("0.33.0rc1", True),
        ("1.0.0", True),
        ("not installed", False),
    ],
)
def test_version_gate(version: str, ok: bool) -> None:
    from moe_plugin.vllm_plugin import _version_supported

    assert _version_supported(version) is ok
