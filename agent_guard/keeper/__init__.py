"""Moved to :mod:`agent_guard.engine.keeper`: this path stays importable (the same module
object, private names included) and warns."""

import sys
import warnings

from agent_guard.engine import keeper as _module
from agent_guard.engine.keeper import *  # noqa: F403 - the names type checkers see here

warnings.warn("agent_guard.keeper moved to agent_guard.engine.keeper: import it from there",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _module
