"""Moved to :mod:`agent_guard.engine.usage`: this path stays importable (the same module
object, private names included) and warns."""

import sys
import warnings

from agent_guard.engine import usage as _module
from agent_guard.engine.usage import *  # noqa: F403 - the names type checkers see here

warnings.warn("agent_guard.usage moved to agent_guard.engine.usage: import it from there",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _module
