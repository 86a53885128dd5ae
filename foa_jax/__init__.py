"""foa-jax: profile-aware preference optimisation for real-world super-resolution on FLUX.2, in JAX.

The core is pure JAX over parameter pytrees named like diffusers' state dicts; nothing under `foa_jax` imports torch.

    import foa_jax
    foa_jax.losses.charbonnier(x, y)          # every public module is an attribute, imported on first use
    foa_jax.models.flux2.preset("tiny")       # subpackages bring their modules along

Modules are imported lazily (PEP 562), so `import foa_jax` stays cheap and a module whose optional dependency is
missing fails only when it is used.
"""

from __future__ import annotations

import importlib
import pkgutil

__version__ = "0.1.0"

_SUBPACKAGES = ("data", "models")


def _public(path) -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(path) if not m.name.startswith("_"))


__all__ = _public(__path__)


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module 'foa_jax' has no attribute {name!r}; its modules: {', '.join(__all__)}")
    module = importlib.import_module(f"{__name__}.{name}")
    if name in _SUBPACKAGES:  # `foa_jax.models.flux2` works without importing foa_jax.models.flux2 first
        for sub in _public(module.__path__):
            importlib.import_module(f"{module.__name__}.{sub}")
    return module


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
