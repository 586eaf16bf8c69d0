"""Triton's interpreter, for the CUDA platform's kernels on a machine without a GPU (TRITON_INTERPRET=1: the
kernels run on CPU tensors, through numpy).

Triton 3.9 reads the variable from os.environ on every access (knobs.runtime.interpret), at moments that matter
here: when @triton.jit decorates a function (an InterpretedFunction, else a JITFunction that needs a GPU),
including triton.language's own helpers (tl.cdiv, tl.max, ...), decorated when triton is first imported; and at
launch (lazy imports such as triton.experimental.gluon assert it, constexpr functions read it). So, without a
GPU: the variable is set before triton is imported, a private copy of the kernel module is loaded from its file
and the variable is restored at once. `interpreting()` sets it again, and makes the private copy the module
plexus.platforms.cuda's lazy imports find, only while it is active (a module-scoped fixture of each test file
that launches kernels). Nothing else in such a session can launch a Triton kernel (no GPU), torch.compile's CPU
path only imports triton, and xgrammar's Triton kernel (imported lazily) serves CUDA tensors only. Should
another module have imported triton before this one without the variable, its modules are set aside from
sys.modules while an interpreted copy is imported (the compiled extension triton._C is shared) and put back
after; `interpreting()` swaps the copy in."""
from __future__ import annotations

import contextlib
import importlib.util
import os
import pathlib
import sys

import torch

INTERPRET = not torch.cuda.is_available()
KERNELS_MODULE = "plexus.platforms.cuda.triton_kernels"


def _set_interpret(value: str | None) -> str | None:
    """Sets (or, for None, unsets) TRITON_INTERPRET; returns what it was."""
    saved = os.environ.get("TRITON_INTERPRET")
    if value is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = value
    return saved


def _swap_triton(modules: dict) -> dict:
    """Puts `modules` in sys.modules in place of triton's Python modules there (the compiled extension
    triton._C stays: one per process); returns those."""
    current = {name: mod for name, mod in sys.modules.items()
               if (name == "triton" or name.startswith("triton.")) and not name.startswith("triton._C")}
    for name in current:
        del sys.modules[name]
    sys.modules.update(modules)
    return current


_outside_triton: dict = {}      # triton as imported without the interpreter before this file, if it was
_interpreted_triton: dict = {}  # then: the interpreted copy, swapped in while this file's tests run
if INTERPRET:
    _saved_env = _set_interpret("1")
    if "triton" in sys.modules:
        _outside_triton = _swap_triton({})
    try:
        import triton  # noqa: F401  (imported, and the kernels decorated, under the interpreter)

        _spec = importlib.util.spec_from_file_location(
            "_plexus_triton_kernels_interpreted",
            pathlib.Path(__file__).resolve().parents[1] / "plexus" / "platforms" / "cuda" / "triton_kernels.py")
        kernels = importlib.util.module_from_spec(_spec)
        _spec.loader.exec_module(kernels)
    finally:
        if _outside_triton:
            _interpreted_triton = _swap_triton(_outside_triton)
        _set_interpret(_saved_env)
else:
    from plexus.platforms.cuda import triton_kernels as kernels


@contextlib.contextmanager
def interpreting():
    """TRITON_INTERPRET=1, the interpreted triton (where another was imported first) and the interpreted kernel
    module as plexus.platforms.cuda.triton_kernels while active; all as they were afterwards. On a GPU: the
    real module, nothing changed."""
    global _interpreted_triton
    if not INTERPRET:
        yield kernels
        return
    import plexus.platforms.cuda as package

    saved_env = _set_interpret("1")
    outside = _swap_triton(_interpreted_triton) if _interpreted_triton else None
    saved_module = sys.modules.get(KERNELS_MODULE)
    saved_attr = package.__dict__.get("triton_kernels")
    sys.modules[KERNELS_MODULE] = kernels
    package.triton_kernels = kernels
    try:
        yield kernels
    finally:
        if saved_module is None:
            sys.modules.pop(KERNELS_MODULE, None)
        else:
            sys.modules[KERNELS_MODULE] = saved_module
        if saved_attr is None:
            del package.triton_kernels
        else:
            package.triton_kernels = saved_attr
        if outside is not None:
            _interpreted_triton = _swap_triton(outside)
        _set_interpret(saved_env)
