"""Moved to :mod:`agent_guard.engine.budgets`: this path stays importable (the same module
object, private names included) and warns."""

import sys
import warnings

from agent_guard.engine import budgets as _module
from agent_guard.engine.budgets import *  # noqa: F403 - the names type checkers see here

warnings.warn("agent_guard.budgets moved to agent_guard.engine.budgets: import it from there",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _module
