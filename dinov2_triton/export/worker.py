"""Run an export worker (`python -m dinov2_triton.export.<module> ...`) in a child process.

ModelOpt patches ONNX Runtime's quantizer and logging at import
(docs/environment.md), so the variants that use it (onnx_fp16, onnx_int8,
trt_fp8) run it in a child process: nothing leaks into the export process,
and a crash or a hang costs one variant, not the export.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple, Sequence

LOG_TAIL_LINES = 15


class WorkerRun(NamedTuple):
    lines: list  # the worker's stdout and stderr, line by line
    seconds: float


def run_worker(module: str, args: Sequence[str], *, output: Path, log_path: Path, timeout_s: float,
               error: type[Exception], what: str, timeout_option: str,
               timeout_what: str | None = None) -> WorkerRun:
    """Run `python -m <module> <args>` (a module of this installed package) in the
    folder of `log_path`, its stdout and stderr written there.

    Raises `error` when it runs past `timeout_s` ("<timeout_what or what> timed
    out after N s (<timeout_option>); log: ..."), exits non-zero or leaves no
    `output` file ("<what> failed (exit N); log ...:" and the log's last lines).
    """
    cmd = [sys.executable, "-m", module, *args]
    t = time.perf_counter()
    with open(log_path, "w") as fh:
        try:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=str(Path(log_path).resolve().parent),
                                  timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            raise error(f"{timeout_what or what} timed out after {timeout_s:.0f} s ({timeout_option}); "
                        f"log: {log_path}") from None
    seconds = time.perf_counter() - t
    lines = Path(log_path).read_text(errors="replace").splitlines()
    if proc.returncode != 0 or not Path(output).is_file():
        tail = "\n".join(lines[-LOG_TAIL_LINES:])
        raise error(f"{what} failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    return WorkerRun(lines, seconds)
