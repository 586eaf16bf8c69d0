"""Platform discovery: pluggy hooks loaded from the ``plexus.platforms``
entry-point group. The built-in platforms register the same way a
third-party package does."""
from __future__ import annotations

import importlib

import pluggy

from plexus.platforms.interface import Platform

ENTRY_POINT_GROUP = "plexus.platforms"
hookspec = pluggy.HookspecMarker("plexus")
hookimpl = pluggy.HookimplMarker("plexus")

# Used only when plexus runs from a source tree that was never installed, so
# its own entry points are not in the environment's metadata.
_BUILTIN_MODULES = ("plexus.platforms.cpu", "plexus.platforms.cuda", "plexus.platforms.neuron")


class PlatformSpec:
    @hookspec
    def plexus_platform(self) -> Platform | None:
        """Return the Platform this plugin provides (or None)."""


def _plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("plexus")
    pm.add_hookspecs(PlatformSpec)
    pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    for module_name in _BUILTIN_MODULES:
        module = importlib.import_module(module_name)
        if not pm.is_registered(module):
            pm.register(module, name=f"builtin:{module_name}")
    return pm


def registered_platforms() -> dict[str, Platform]:
    """All platforms the environment provides, by name. Entry points are
    scanned on every call, so a package installed after import is seen."""
    platforms: dict[str, Platform] = {}
    for platform in _plugin_manager().hook.plexus_platform():
        if platform is None:
            continue
        if not isinstance(platform, Platform):
            raise TypeError(f"plexus_platform() returned {platform!r}, which is not a plexus Platform")
        platforms.setdefault(platform.name, platform)
    return platforms


def resolve_platform(device: str, options: dict | None = None) -> Platform:
    """``device="auto"`` picks the available platform with the highest
    priority (neuron, then cuda, then cpu); a name picks that platform.
    options: the platform-specific engine options (EngineConfig.extra)."""
    platforms = registered_platforms()
    names = ", ".join(sorted(platforms))
    if device == "auto":
        available = [p for p in platforms.values() if p.is_available()]
        if not available:
            raise RuntimeError(f"no platform is available; registered platforms: {names}")
        return max(available, key=lambda p: p.auto_priority)
    if device not in platforms:
        raise ValueError(f"unknown device {device!r}; registered platforms: auto, {names}")
    platform = platforms[device]
    if not platform.is_available_for(options or {}):
        raise RuntimeError(f"device={device!r}: {platform.unavailable_reason()}")
    return platform
