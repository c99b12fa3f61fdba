"""The Hopper extension (``gptq_marlin_hopper_ext``), built only for sm_90a.

A second :class:`gptq_core.jit.Extension` beside the marlin one, so the marlin extension keeps
building for every GPU while this one needs ``-gencode=arch=compute_90a,code=sm_90a`` (wgmma
exists only on the "a" target: HOPPER.md of the device notes; docs/DESIGN.md §3 plugin
contract, §10 errors). Passing the -gencode flag also stops torch's builder from adding its own
architecture flags (a plain sm_90 pass would reject wgmma).
"""

from __future__ import annotations

import sys
from pathlib import Path

from gptq_core import jit

CSRC = Path(__file__).with_name("csrc")
EXTENSION_NAME = "gptq_marlin_hopper_ext"
ARCH_FLAGS = ("-gencode=arch=compute_90a,code=sm_90a",)


class BuildError(jit.BuildError):
    """The Hopper extension could not be built or loaded; the message says why."""


EXTENSION = jit.Extension(
    name=EXTENSION_NAME, csrc=CSRC, cache_name="gptq-backend-marlin-hopper",
    what="the marlin Hopper (sm_90a) extension", python_module=True, error=BuildError,
    hash_salt=" ".join(ARCH_FLAGS),
)

sources = EXTENSION.sources
failure = EXTENSION.failure
module = EXTENSION.module


def load(folder: Path | None = None, verbose: bool = False) -> Path:
    """Build (if needed) and load the extension for sm_90a; return its build folder.

    Raises BuildError (also when no GPU of compute capability 9.0 is present: nothing else
    runs this code)."""
    def target() -> jit.Target:
        if (9, 0) not in jit.present_archs():
            raise BuildError("the Hopper kernels need a GPU of compute capability 9.0 (H100/H200)")
        return jit.Target(("sm90a",), ARCH_FLAGS)

    return EXTENSION.load(target, folder, verbose)


if __name__ == "__main__":
    print(load(verbose="--verbose" in sys.argv))
