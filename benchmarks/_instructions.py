"""Instruction counts of code regions, under ``valgrind --tool=callgrind``.

Wall time on a shared machine moves by tens of percent from run to run; the number of
instructions a region executes does not. A benchmark calls :func:`rerun_under_callgrind`
first: unless it already runs under callgrind (or valgrind is missing, or the machine is
not x86-64 Linux) it re-runs itself under callgrind with instrumentation off until
:func:`region` switches it on, so the imports and warm-up run at near native speed.
Each ``with region("name"):`` then zeroes callgrind's counters on entry and dumps them
on exit; :func:`read_regions` (in the parent) sums the dumps per name.

The client requests are valgrind's documented magic instruction sequence (the
``CALLGRIND_*`` macros of ``valgrind/callgrind.h``), put in an executable page with
ctypes: no compiler is needed. Outside valgrind the sequence is a no-op.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_ENV = "AGENT_GUARD_CALLGRIND_DIR"
# mov $0,%edx; mov %rdi,%rax; rol $3,$13,$61,$51 %rdi (the preamble); xchg %rbx,%rbx;
# mov %rdx,%rax; ret  -- VALGRIND_DO_CLIENT_REQUEST_EXPR for amd64
_CODE = bytes.fromhex("ba00000000" "4889f8" "48c1c703" "48c1c70d" "48c1c73d" "48c1c733"
                      "4887db" "4889d0" "c3")
_BASE = (ord("C") << 24) | (ord("T") << 16)
DUMP_STATS_AT, ZERO_STATS, START = _BASE + 3, _BASE + 1, _BASE + 4

_request = None
_started = False


def supported() -> bool:
    return (sys.platform == "linux" and platform.machine() in ("x86_64", "AMD64")
            and shutil.which("valgrind") is not None)


def active() -> bool:
    """Whether this process runs under callgrind (started by rerun_under_callgrind)."""
    return bool(os.environ.get(_ENV))


def _client_request(code: int, arg: int = 0) -> int:
    global _request
    if _request is None:
        page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE
                         | mmap.PROT_EXEC)
        page.write(_CODE)
        address = ctypes.addressof(ctypes.c_char.from_buffer(page))
        _request = (ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_void_p)(address), page)
    args = (ctypes.c_ulong * 6)(code, arg, 0, 0, 0, 0)
    return int(_request[0](ctypes.addressof(args)))


@contextlib.contextmanager
def region(name: str) -> Iterator[None]:
    """Count the instructions of the body as ``name`` (no-op outside callgrind)."""
    global _started
    if not active():
        yield
        return
    if not _started:
        _client_request(START)
        _started = True
    label = ctypes.create_string_buffer(name.encode())
    _client_request(ZERO_STATS)
    yield
    _client_request(DUMP_STATS_AT, ctypes.addressof(label))


def rerun_under_callgrind(argv: list[str]) -> Path | None:
    """Run ``python argv...`` under callgrind and return the directory of its dumps;
    None when callgrind is not available. Set in the child, this is a no-op."""
    if active() or not supported():
        return None
    out = Path(tempfile.mkdtemp(prefix="agent-guard-callgrind-"))
    env = {**os.environ, _ENV: str(out), "PYTHONHASHSEED": "0"}
    cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes",
           f"--callgrind-out-file={out}/callgrind.out.%p", sys.executable, *argv]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return out


def read_regions(directory: Path, all_threads: bool = False) -> dict[str, list[int]]:
    """``{region name: [instructions of each time it ran]}`` from callgrind's dumps: the
    main thread's, or with ``all_threads`` every thread's of the same dump summed (work
    an async path hands to executor threads counts too)."""
    found: dict[str, list[int]] = {}
    dumps: dict[tuple[int, ...], list[Any]] = {}  # dump -> [trigger, instructions]
    for path in sorted(directory.glob("callgrind.out.*"), key=_dump_order):
        if path.name.endswith("-"):
            continue
        if not all_threads and not path.name.endswith("-01"):
            continue  # the main thread only: the lease keeper polls by the clock
        text = path.read_text(errors="replace")
        trigger = re.search(r"^desc: Trigger: Client Request: (.*)$", text, re.M)
        totals = re.search(r"^(?:totals|summary): (\d+)", text, re.M)
        if trigger and totals:
            entry = dumps.setdefault(_dump_order(path)[:-1], [trigger.group(1).strip(), 0])
            entry[1] += int(totals.group(1))
    for trigger, instructions in dumps.values():
        found.setdefault(trigger, []).append(instructions)
    return found


def _dump_order(path: Path) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", path.name))
