"""Load the bundled kernel library (building it on first use) and call its entry points.

The library declares its own interface (csrc/api.h): the signature of every entry point,
the fields of the structs the host reads and the constants it shares with the kernels, all
read here when the library loads. Every entry point gets ctypes argument and return types
from its signature, and `call` takes its arguments by the declared parameter names, so a
missing, unknown or ill-typed argument is an error naming it, never a shifted position.
"""

from __future__ import annotations

import ctypes
import dataclasses
import re
import threading
from pathlib import Path
from typing import Any

import torch

from moe_plugin.kernels.build import ensure_built

_SCALARS: dict[str, Any] = {
    "int": ctypes.c_int,
    "long long": ctypes.c_longlong,
    "double": ctypes.c_double,
    "const char*": ctypes.c_char_p,
}


@dataclasses.dataclass(frozen=True)
class Signature:
    """One entry point of csrc/api.h: C return type, name, and (C type, name) parameters."""

    restype: str
    name: str
    params: tuple[tuple[str, str], ...]

    @property
    def param_names(self) -> tuple[str, ...]:
        """The parameters' names, in the C order."""
        return tuple(p for _, p in self.params)

    @property
    def returns_status(self) -> bool:
        """Whether the function returns a status (int, 0 = success) rather than a value."""
        return self.restype == "int"


def _ctype(text: str) -> Any:
    """The ctypes type of a C type of api.h: pointers are void*, scalars as declared."""
    if text.endswith("*") and text != "const char*":
        return ctypes.c_void_p
    if text not in _SCALARS:
        raise ValueError(f"C type {text!r} has no ctypes counterpart in the binding")
    return _SCALARS[text]


def _normalize(text: str) -> str:
    """A C type with single spaces and no space before a `*`."""
    return re.sub(r"\s*\*", "*", " ".join(text.split()))


def parse_signatures(text: str) -> dict[str, Signature]:
    """The signatures of `moe_signatures()`'s text (one "ret name(type name, ...)" a line)."""
    out = {}
    for line in text.splitlines():
        m = re.fullmatch(r"\s*(.+?)\s*\b(\w+)\s*\((.*)\)\s*", line)
        if not m:
            if line.strip():
                raise ValueError(f"unreadable signature {line!r}")
            continue
        restype, name, params_text = _normalize(m[1]), m[2], m[3].strip()
        params = []
        if params_text not in ("", "void"):
            for param in params_text.split(","):
                p = re.fullmatch(r"\s*(.+?)\s*\b(\w+)\s*", param)
                if not p:
                    raise ValueError(f"unreadable parameter {param!r} of {name}")
                params.append((_normalize(p[1]), p[2]))
        sig = Signature(restype, name, tuple(params))
        _ctype(restype)
        for ctype, _ in sig.params:
            _ctype(ctype)
        out[name] = sig
    return out


def parse_structs(text: str) -> dict[str, type[ctypes.Structure]]:
    """ctypes structures of `moe_structs()`'s text (one "key: type name; ..." a line)."""
    out: dict[str, type[ctypes.Structure]] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        key, _, body = line.partition(":")
        fields = []
        for field in filter(None, (f.strip() for f in body.split(";"))):
            ctype, _, name = _normalize(field).rpartition(" ")
            fields.append((name, _ctype(ctype)))
        out[key.strip()] = type(key.strip(), (ctypes.Structure,), {"_fields_": fields})
    return out


class Library:
    """The kernel library at `path` with its declared interface, checked when it loads:
    every declared entry point exists and has ctypes types, and each struct's ctypes size
    equals the C size (constant `sizeof_<key>`)."""

    def __init__(self, path: Path | str) -> None:
        self.cdll = ctypes.CDLL(str(path))
        declare = self.cdll.moe_signatures
        declare.restype, declare.argtypes = ctypes.c_char_p, []
        self.signatures = parse_signatures(declare().decode())
        self._functions: dict[str, Any] = {}
        for sig in self.signatures.values():
            try:
                fn = getattr(self.cdll, sig.name)
            except AttributeError:
                raise RuntimeError(f"{path}: declares {sig.name} but does not export it") from None
            fn.restype = _ctype(sig.restype)
            fn.argtypes = [_ctype(ctype) for ctype, _ in sig.params]
            self._functions[sig.name] = fn
        names = self._raw("moe_constant_names").decode().split()
        values = (ctypes.c_longlong * len(names))()
        self._check("moe_constant_values", self._raw("moe_constant_values", values, len(names)))
        self.constants: dict[str, int] = dict(zip(names, values, strict=True))
        self.structs = parse_structs(self._raw("moe_structs").decode())
        for key, struct in self.structs.items():
            size = self.constants.get(f"sizeof_{key}")
            if size != ctypes.sizeof(struct):
                raise RuntimeError(
                    f"{path}: struct {key} is {size} bytes in C but {ctypes.sizeof(struct)} "
                    "as declared to ctypes"
                )

    def call(self, name: str, /, **args: Any) -> Any:
        """Call entry point `name` with every declared parameter named once. Tensors pass
        their data pointer and None a null pointer where a pointer is declared. Returns the
        value of a query; a non-zero status raises RuntimeError naming the function and the
        CUDA (or library) error."""
        sig = self.signatures.get(name)
        if sig is None:
            raise RuntimeError(f"{name} is not an entry point of the kernel library")
        declared = sig.param_names
        if len(args) != len(declared) or not all(p in args for p in declared):
            missing = [p for p in declared if p not in args]
            unknown = [a for a in args if a not in declared]
            raise TypeError(f"{name}({', '.join(declared)}): missing {missing}, unknown {unknown}")
        values = [_argument(name, ctype, p, args[p]) for ctype, p in sig.params]
        try:
            result = self._functions[name](*values)
        except ctypes.ArgumentError as e:
            index = re.match(r"argument (\d+)", str(e))
            ctype, param = sig.params[int(index[1]) - 1] if index else ("?", "?")
            raise TypeError(f"{name}: {param} ({ctype}) got {args.get(param)!r}: {e}") from e
        if sig.returns_status:
            self._check(name, result)
            return None
        return result.decode() if isinstance(result, bytes) else result

    def _raw(self, name: str, *args: Any) -> Any:
        return self._functions[name](*args)

    def _check(self, name: str, status: int) -> None:
        if status != 0:
            message = self._raw("moe_status_string", status).decode()
            raise RuntimeError(f"{name} failed with status {status}: {message}")


def _argument(function: str, ctype: str, name: str, value: Any) -> Any:
    """`value` as the argument for parameter `name` of C type `ctype`."""
    if isinstance(value, torch.Tensor):
        if not ctype.endswith("*"):
            raise TypeError(f"{function}: {name} is {ctype}, got a tensor")
        return value.data_ptr()
    if isinstance(value, bool):
        return int(value)
    return value


_lock = threading.Lock()
_library: Library | None = None


def library() -> Library:
    """The loaded library, built for the current CUDA device's architecture if needed."""
    global _library
    with _lock:
        if _library is None:
            _library = Library(ensure_built(verbose=True))
        return _library


def call(name: str, /, **args: Any) -> Any:
    """`library().call(name, **args)`: see `Library.call`."""
    return library().call(name, **args)


def constant(name: str) -> int:
    """The library's constant `name` (csrc/api.h, MOE_CONSTANTS)."""
    return library().constants[name]


def struct(key: str) -> type[ctypes.Structure]:
    """The ctypes structure of the library's struct `key` (csrc/api.h, MOE_STRUCTS)."""
    return library().structs[key]


def stream(device: torch.device | None = None) -> int:
    """The current torch CUDA stream of `device` (default: current device), as a handle."""
    return torch.cuda.current_stream(device).cuda_stream
