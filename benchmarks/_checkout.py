"""Imported first by the benchmarks: measure the agent_guard of this checkout.

Run as ``python benchmarks/bench_x.py``, Python puts ``benchmarks/`` on the path, not
the checkout's root, so ``import agent_guard`` would find whatever installed copy the
environment has (an editable install of another worktree, say) and time that instead.
"""

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parent.parent)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
