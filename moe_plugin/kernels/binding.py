"""Load the bundled kernel library (building it on first use) and call its entry points.

Every exported function takes `void*`, `long long` and `double` arguments and returns an int
status (0 = success); `call` converts Python arguments and turns a status into a
RuntimeError carrying the CUDA (or library) error string.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any

import torch

from moe_plugin.kernels.build import ensure_built

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_functions: dict[str, Any] = {}


def library() -> ctypes.CDLL:
    """The loaded library, built for the current CUDA device's architecture if needed."""
    global _lib
    with _lock:
        if _lib is None:
            lib = ctypes.CDLL(str(ensure_built(verbose=True)))
            lib.moe_status_string.restype = ctypes.c_char_p
            lib.moe_status_string.argtypes = [ctypes.c_longlong]
            _lib = lib
        return _lib


def _function(name: str) -> Any:
    fn = _functions.get(name)
    if fn is None:
        fn = getattr(library(), name)
        fn.restype = ctypes.c_int
        _functions[name] = fn
    return fn


def _convert(arg: Any) -> Any:
    if isinstance(arg, torch.Tensor):
        return ctypes.c_void_p(arg.data_ptr())
    if isinstance(arg, bool | int):
        return ctypes.c_longlong(int(arg))
    if isinstance(arg, float):
        return ctypes.c_double(arg)
    if arg is None:
        return ctypes.c_void_p(None)
    return arg  # already a ctypes value (pointer, buffer, array)


def call(name: str, *args: Any) -> None:
    """Call the library's `name(*args)`; raise RuntimeError naming it on a non-zero status.

    Tensors pass their data pointer, ints (and bools) pass as long long, floats as double,
    None as a null pointer, ctypes values as they are."""
    status = _function(name)(*(_convert(a) for a in args))
    if status != 0:
        message = library().moe_status_string(status).decode()
        raise RuntimeError(f"{name} failed with status {status}: {message}")


def stream(device: torch.device | None = None) -> ctypes.c_void_p:
    """The current torch CUDA stream of `device` (default: current device) as a handle."""
    return ctypes.c_void_p(torch.cuda.current_stream(device).cuda_stream)
