"""Platforms come from the plexus.platforms entry-point group; a third-party
package adds one exactly as the built-in CPU platform does."""
from __future__ import annotations

import importlib
import sys
import textwrap

import pytest
import torch

from plexus import LLM, SamplingParams
from plexus.platforms.registry import registered_platforms, resolve_platform


def test_cpu_platform_registers_through_the_entry_point_group():
    from importlib.metadata import entry_points

    assert "plexus.platforms.cpu" in [ep.value for ep in entry_points(group="plexus.platforms")]
    assert registered_platforms()["cpu"].device_type == "cpu"


def test_auto_resolves_to_an_available_platform():
    platform = resolve_platform("auto")
    assert platform.is_available()


@pytest.fixture
def third_party_platform(tmp_path, monkeypatch):
    """A distribution on sys.path with its own dist-info and entry point, as `pip install` would leave it."""
    pkg = tmp_path / "acme_plexus"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent("""
        from plexus.platforms.cpu import CpuPlatform
        from plexus.platforms.registry import hookimpl

        class AcmePlatform(CpuPlatform):
            name = "acme"
            device_type = "cpu"
            auto_priority = -1
            workers_made = 0

            def make_worker(self, config, rank=0):
                type(self).workers_made += 1
                return super().make_worker(config, rank)

        @hookimpl
        def plexus_platform():
            return AcmePlatform()
    """))
    dist = tmp_path / "acme_plexus-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-plexus\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[plexus.platforms]\nacme = acme_plexus\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield
    sys.modules.pop("acme_plexus", None)


def test_third_party_platform_is_discovered_and_used(third_party_platform):
    assert "acme" in registered_platforms()
    llm = LLM(device="acme", dtype="float32", max_model_len=256, kv_cache_space=0.02)
    platform = llm.llm_engine.config.platform
    assert platform.name == "acme" and type(platform).workers_made == 1
    out = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 3
    # The third-party platform has lower priority, so auto still picks a built-in one.
    assert resolve_platform("auto").name != "acme"


@pytest.mark.parametrize("checkpoint", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("has_bf16, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_dtype_prefers_bf16_on_cpus_with_bf16_and_never_fp16(monkeypatch, checkpoint, has_bf16, expected):
    from plexus.platforms import cpu, host

    class _Model:
        dtype = checkpoint
        dtype_is_auto = True

    class _Config:
        model = _Model()
        quantization = None

    monkeypatch.setattr(host, "cpu_has_bf16", lambda: has_bf16)
    cpu.CpuPlatform().check_and_update_config(_Config)
    assert _Config.model.dtype == expected
    # An explicit dtype is kept, except fp16, which no CPU here runs at a usable speed.
    _Config.model.dtype_is_auto, _Config.model.dtype = False, checkpoint
    cpu.CpuPlatform().check_and_update_config(_Config)
    assert _Config.model.dtype == (expected if checkpoint == torch.float16 else checkpoint)
