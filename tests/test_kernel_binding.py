"""The binding's reading of a library's declared interface (csrc/api.h), on small stand-in
libraries compiled with the host C compiler: a declaration the library does not honour (a
declared function it does not export, a struct whose C size differs from its declared
fields, a type the binding cannot pass) is an error when the library loads."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from moe_plugin.kernels import binding

CC = shutil.which("cc") or shutil.which("gcc")

# The interface functions every library exports; {signatures}, {structs}, {names}, {values}
# are filled in per stand-in.
_INTERFACE = r"""
#include <string.h>
const char* moe_signatures(void) { return %(signatures)s; }
const char* moe_structs(void) { return %(structs)s; }
const char* moe_constant_names(void) { return %(names)s; }
int moe_constant_values(long long* v, long long n) {
  const long long values[] = {%(values)s};
  if (n < (long long)(sizeof(values) / sizeof(values[0]))) return 1;
  memcpy(v, values, sizeof(values));
  return 0;
}
const char* moe_status_string(long long status) { return status == 7 ? "seven" : "?"; }
"""
_BASE_SIGNATURES = (
    "const char* moe_signatures(void)\n"
    "const char* moe_structs(void)\n"
    "const char* moe_constant_names(void)\n"
    "int moe_constant_values(long long* values, long long capacity)\n"
    "const char* moe_status_string(long long status)\n"
)


def _c_string(text: str) -> str:
    return '"' + text.replace("\n", "\\n") + '"'


def _stand_in(
    tmp_path: Path,
    *,
    signatures: str,
    body: str,
    structs: str = "",
    constants: dict[str, int] | None = None,
) -> Path:
    """A shared library exporting the interface functions plus `body`, declaring
    `signatures` (besides the interface's), `structs` and `constants`."""
    constants = constants or {"answer": 42}
    source = _INTERFACE % {
        "signatures": _c_string(_BASE_SIGNATURES + signatures),
        "structs": _c_string(structs),
        "names": _c_string(" ".join(constants)),
        "values": ", ".join(str(v) for v in constants.values()),
    }
    src = tmp_path / "stand_in.c"
    src.write_text(source + body)
    lib = tmp_path / "libstand_in.so"
    subprocess.run([CC, "-shared", "-fPIC", str(src), "-o", str(lib)], check=True)
    return lib


pytestmark = pytest.mark.skipif(CC is None, reason="no C compiler")


def test_declared_interface_is_read(tmp_path: Path) -> None:
    lib = binding.Library(
        _stand_in(
            tmp_path,
            signatures="int moe_scale(long long n, double f, const long long* out)\n",
            body="int moe_scale(long long n, double f, const long long* out) {"
            " return n < 0 ? 7 : 0; }\n",
            structs="pair: int a; long long b;\n",
            constants={"answer": 42, "sizeof_pair": 16},
        )
    )
    assert lib.constants == {"answer": 42, "sizeof_pair": 16}
    assert [name for name, _ in lib.structs["pair"]._fields_] == ["a", "b"]
    assert lib.signatures["moe_scale"].param_names == ("n", "f", "out")
    lib.call("moe_scale", n=1, f=0.5, out=None)
    with pytest.raises(RuntimeError, match="moe_scale failed with status 7: seven"):
        lib.call("moe_scale", n=-1, f=0.5, out=None)
    with pytest.raises(TypeError, match=r"missing \['f'\], unknown \['g'\]"):
        lib.call("moe_scale", n=1, g=0.5, out=None)


def test_declared_but_not_exported_is_caught(tmp_path: Path) -> None:
    path = _stand_in(tmp_path, signatures="int moe_missing(void* plan)\n", body="")
    with pytest.raises(RuntimeError, match="declares moe_missing but does not export it"):
        binding.Library(path)


def test_struct_size_mismatch_is_caught(tmp_path: Path) -> None:
    path = _stand_in(
        tmp_path,
        signatures="",
        body="",
        structs="pair: int a; long long b;\n",
        constants={"sizeof_pair": 12},
    )
    with pytest.raises(RuntimeError, match="struct pair is 12 bytes in C but 16"):
        binding.Library(path)


def test_unknown_c_type_is_caught(tmp_path: Path) -> None:
    path = _stand_in(
        tmp_path, signatures="int moe_half(float x)\n", body="int moe_half(float x) { return 0; }\n"
    )
    with pytest.raises(ValueError, match="C type 'float' has no ctypes counterpart"):
        binding.Library(path)


def test_parse_signatures() -> None:
    sigs = binding.parse_signatures(
        "const char *moe_a(void)\nint moe_b(void** out, struct S* s, const long long* v)\n"
    )
    assert sigs["moe_a"].restype == "const char*" and sigs["moe_a"].params == ()
    assert sigs["moe_b"].params == (
        ("void**", "out"),
        ("struct S*", "s"),
        ("const long long*", "v"),
    )
    assert sigs["moe_b"].returns_status
    with pytest.raises(ValueError, match="unreadable"):
        binding.parse_signatures("moe_c")
    assert ctypes.sizeof(binding.parse_structs("s: int a; int b; long long c;\n")["s"]) == 16
