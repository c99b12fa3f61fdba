"""gptq_core.jit, the one JIT-build helper of every compiled backend (docs/DESIGN.md §3, §10):
the cache key follows sources and flags, a real tiny C++ module builds and loads once, and
failures (no compiler, a compiler error) are one clear line, remembered for the process."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from gptq_core import jit
from gptq_core.errors import GPTQError

GOOD = r"""
#include <Python.h>
#define JIT_CAT2(a, b) a##b
#define JIT_CAT(a, b) JIT_CAT2(a, b)
#define JIT_STR2(a) #a
#define JIT_STR(a) JIT_STR2(a)
static PyObject* answer(PyObject*, PyObject*) { return PyLong_FromLong(ANSWER); }
static PyMethodDef methods[] = {{"answer", answer, METH_NOARGS, "the answer"}, {nullptr, nullptr, 0, nullptr}};
static PyModuleDef def = {PyModuleDef_HEAD_INIT, JIT_STR(TORCH_EXTENSION_NAME), nullptr, -1, methods};
PyMODINIT_FUNC JIT_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&def); }
"""

needs_toolchain = pytest.mark.skipif(shutil.which(jit.compiler()) is None or shutil.which("ninja") is None,
                                     reason="needs a C++ compiler and ninja")


class TinyError(jit.BuildError):
    """A backend's own BuildError, as each build.py declares one."""


def tiny(csrc: Path, name: str, **kw) -> jit.Extension:
    return jit.Extension(name=name, csrc=csrc, cache_name="gptq-test-jit", what="the tiny extension",
                         source_globs=("*.cpp",), hashed_suffixes=(".cpp", ".h"), cuda=False,
                         error=TinyError, **kw)


def write(csrc: Path, text: str) -> Path:
    csrc.mkdir(parents=True, exist_ok=True)
    (csrc / "tiny.cpp").write_text(text)
    return csrc


def test_cache_key_follows_sources_flags_and_key_parts(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    csrc = write(tmp_path / "csrc", GOOD)
    ext = tiny(csrc, "tiny_key")
    first = ext.build_dir(("gcc", "sm90"))
    assert first.parent == tmp_path / "cache" / "gptq-test-jit"
    assert first.name.endswith(f"-gcc-sm90-{ext.source_hash()}") and "+" not in first.name
    assert ext.build_dir(("gcc", "sm80")) != first
    assert tiny(csrc, "tiny_key", hash_salt="-O2").build_dir(("gcc", "sm90")) != first
    (csrc / "extra.h").write_text("// a header counts too\n")
    assert ext.build_dir(("gcc", "sm90")) != first
    (csrc / "notes.txt").write_text("not a source\n")
    assert ext.source_hash() == tiny(csrc, "tiny_key").source_hash()
    assert ext.build_dir(("gcc",), tmp_path / "mine") == tmp_path / "mine"
    assert ext.sources() == [csrc / "tiny.cpp"]
    shared = tiny(csrc, "tiny_key", shared_headers=True)
    assert shared.include_dirs() == [csrc, jit.SHARED_CSRC] and (jit.SHARED_CSRC / "gptq_check.h").is_file()
    assert shared.source_hash() != ext.source_hash()  # the shared header is part of the key


def test_missing_compiler_is_one_clear_error_and_is_remembered(tmp_path, monkeypatch):
    ext = tiny(write(tmp_path / "csrc", GOOD), "tiny_nocxx")
    monkeypatch.setenv("CXX", "no-such-c++")
    with pytest.raises(TinyError, match=r"C\+\+ compiler 'no-such-c\+\+' not found: install g\+\+ \(or set CXX\)"):
        ext.load(folder=tmp_path / "build")
    assert "no-such-c++" in ext.failure() and ext.module() is None
    monkeypatch.delenv("CXX")  # fixed now, but this process already knows the answer
    with pytest.raises(TinyError, match="no-such-c"):
        ext.load(folder=tmp_path / "build")
    assert not (tmp_path / "build").exists()


def test_target_error_is_remembered_as_the_backends_error(tmp_path):
    ext = tiny(write(tmp_path / "csrc", GOOD), "tiny_target")

    def target() -> jit.Target:
        raise jit.BuildError("no GPU to build for; pass --arch")

    for _ in range(2):
        with pytest.raises(TinyError, match="no GPU to build for"):
            ext.load(target, tmp_path / "build")
    assert isinstance(TinyError("x"), GPTQError) and isinstance(TinyError("x"), RuntimeError)


@needs_toolchain
def test_real_build_loads_once_per_process(tmp_path):
    ext = tiny(write(tmp_path / "csrc", GOOD), "gptq_test_jit_tiny", cflags=("-O1", "-DANSWER=42"))
    folder = ext.load(lambda: jit.Target(("c++",)), tmp_path / "build")
    assert folder == tmp_path / "build" and ext.failure() is None
    assert ext.module().answer() == 42
    assert any(p.suffix == ".so" for p in folder.iterdir())
    # once per process: a second call returns the first folder, whatever it asks for
    assert ext.load(folder=tmp_path / "elsewhere") == folder
    assert not (tmp_path / "elsewhere").exists()


@needs_toolchain
def test_compiler_error_is_summarized_and_remembered(tmp_path):
    ext = tiny(write(tmp_path / "csrc", GOOD.replace("return PyLong", "return PyLongg")), "gptq_test_jit_broken",
               cflags=("-DANSWER=1",), summary_lines=1, summary_limit=600)
    with pytest.raises(TinyError) as caught:
        ext.load(folder=tmp_path / "build")
    message = str(caught.value)
    assert message.startswith("building the tiny extension failed: ") and "\n" not in message
    assert "PyLongg" in message and "error" in message
    with pytest.raises(TinyError, match="PyLongg"):
        ext.load(folder=tmp_path / "build")
    assert ext.failure() == message


def test_compute_capability_helpers():
    assert jit.parse_archs("9.0;7.5,86") == [(7, 5), (8, 6), (9, 0)]
    with pytest.raises(TinyError, match="write it like 8.0 or 9.0"):
        jit.parse_archs("hopper", error=TinyError)
    assert jit.gencode_flags([(8, 0)]) == ["-gencode=arch=compute_80,code=sm_80"]
    assert jit.arch_tag([(8, 0), (9, 0)]) == "sm80_sm90" and jit.arch_tag([]) == "none"
    assert jit.parse_arch_list("compute_75\ncompute_90 compute_100") == ((7, 5), (9, 0), (10, 0))
    if jit.nvcc_path() is not None:
        assert (8, 0) in jit.nvcc_arch_list()


CHECKED = r"""
#include <Python.h>
#include "gptq_check.h"
#define JIT_CAT2(a, b) a##b
#define JIT_CAT(a, b) JIT_CAT2(a, b)
#define JIT_STR2(a) #a
#define JIT_STR(a) JIT_STR2(a)
static PyObject* message(PyObject*, PyObject*) {
  std::string text = gptq_check::msg("K=", int64_t(4096), " bits ", 3, " ", at::kBFloat16, " sizes ",
                                     c10::IntArrayRef({2, 3}), " on ", c10::Device("cpu"));
  try {
    GPTQ_CHECK(false, "rejected: group_size=", int64_t(-7));
  } catch (const c10::Error& e) {
    text += "|" + e.msg();
  }
  return PyUnicode_FromString(text.c_str());
}
static PyMethodDef methods[] = {{"message", message, METH_NOARGS, ""}, {nullptr, nullptr, 0, nullptr}};
static PyModuleDef def = {PyModuleDef_HEAD_INIT, JIT_STR(TORCH_EXTENSION_NAME), nullptr, -1, methods};
PyMODINIT_FUNC JIT_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&def); }
"""


@needs_toolchain
def test_shared_check_header_builds_one_string_message(tmp_path):
    """gptq_check.h, which the CUDA bindings include, compiled here against torch's headers."""
    ext = tiny(write(tmp_path / "csrc", CHECKED), "gptq_test_jit_check", shared_headers=True, cflags=("-O0",))
    ext.load(folder=tmp_path / "build")
    text = ext.module().message()
    assert text.startswith("K=4096 bits 3 BFloat16 sizes [2, 3] on cpu|rejected: group_size=-7"), text
