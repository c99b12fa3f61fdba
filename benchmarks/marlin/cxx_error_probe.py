"""Does a C++ argument check of the marlin extension raise, or kill the process? (GPU only.)

`torch.ops.gptq_marlin.gather_cols` once died with SIGSEGV where it should have raised a
RuntimeError from its TORCH_CHECK (NOTES/perf-marlin.md "The SIGSEGV on a bad argument"). Each probe below runs in its own child process, so one crash
does not hide the others: bad arguments to each op (the first check of an op, a later check,
another op), the same with C++ stack traces on, and a torch built-in error as the control.
A probe that dies is re-run under gdb, when gdb is installed, and its backtrace printed.

    python benchmarks/marlin/cxx_error_probe.py

Exit code 1 if any probe crashed or did not raise (marlin's own checks: RuntimeError).
"""

from __future__ import annotations

import shutil
import subprocess
import sys

PRELUDE = (
    "import torch\n"
    "from gptq_backend_marlin import build\n"
    "build.load()\n"
    "dev = 'cuda'\n"
)

PROBES = {
    "control: aten index_select, bad dim": "torch.index_select(torch.randn(4, 8, device=dev), 5, torch.arange(2, device=dev))",
    "gather_cols: x on the CPU (first check)": "torch.ops.gptq_marlin.gather_cols(torch.randn(4, 64).half(), torch.arange(64, device=dev))",
    "gather_cols: float32 x (second check)": "torch.ops.gptq_marlin.gather_cols(torch.randn(4, 64, device=dev), torch.arange(64, device=dev))",
    "gather_cols: short perm": "torch.ops.gptq_marlin.gather_cols(torch.randn(4, 64, device=dev).half(), torch.arange(10, device=dev))",
    "dequantize: bits=5": "torch.ops.gptq_marlin.dequantize(torch.zeros(64, dtype=torch.int32, device=dev), torch.ones(1, 64, device=dev).half(), None, 5, 128, 128, 64)",
}


def child(code: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    import os

    env = dict(os.environ, **(env_extra or {}))
    body = PRELUDE + (
        "try:\n"
        f"    {code}\n"
        "    print('RESULT no error')\n"
        "except Exception as exc:\n"
        "    print('RESULT raised:', type(exc).__name__, str(exc).splitlines()[0][:160])\n"
    )
    return subprocess.run([sys.executable, "-X", "faulthandler", "-c", body], capture_output=True,
                          text=True, timeout=180, env=env), body


def main() -> int:
    bad = 0
    for traces in ("0",):
        for name, code in PROBES.items():
            proc, body = child(code, {"TORCH_SHOW_CPP_STACKTRACES": traces})
            result = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
            # the control may raise any exception type; marlin's own checks must raise RuntimeError
            ok = proc.returncode == 0 and bool(result) and "raised:" in result[0]
            if "control" not in name:
                ok = ok and "RuntimeError" in result[0]
            print(f"[{'ok' if ok else 'FAIL'}] traces={traces} {name}: exit {proc.returncode}: "
                  f"{result[0] if result else proc.stderr.strip()[-300:]}", flush=True)
            if ok:
                continue
            bad += 1
            gdb = shutil.which("gdb")
            if gdb is None:
                print("  (no gdb here; stderr tail follows)\n  " + proc.stderr.strip()[-1500:], flush=True)
                continue
            with open("/tmp/cxx_error_probe_child.py", "w") as f:
                f.write(body)
            g = subprocess.run([gdb, "-q", "-batch", "-ex", "run", "-ex", "bt 40", "--args", sys.executable,
                                "/tmp/cxx_error_probe_child.py"], capture_output=True, text=True, timeout=300,
                               env={**__import__("os").environ, "TORCH_SHOW_CPP_STACKTRACES": traces})
            lines = [ln for ln in g.stdout.splitlines() if ln.startswith("#") or "signal" in ln]
            print("  gdb:\n  " + "\n  ".join(lines[:45]), flush=True)
    print(f"cxx_error_probe: {bad} probe(s) did not raise cleanly", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
