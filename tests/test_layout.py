"""The package layout: the engine in agent_guard.engine, the old module paths still
importable (the very module, with a DeprecationWarning)."""

from __future__ import annotations

import subprocess
import sys

import pytest

MOVED_MODULES = ["budgets", "guard", "keeper", "limits", "records", "usage"]


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("name", MOVED_MODULES)
def test_an_old_module_path_is_the_engine_module_and_warns(name: str) -> None:
    done = _run(
        "import sys, warnings\n"
        "warnings.simplefilter('error', DeprecationWarning)\n"
        f"import agent_guard.engine.{name} as new\n"
        "try:\n"
        f"    import agent_guard.{name}\n"
        "except DeprecationWarning as w:\n"
        "    print('warned:', w)\n"
        "warnings.simplefilter('ignore', DeprecationWarning)\n"
        f"import agent_guard.{name} as old\n"
        f"print('same' if old is new and sys.modules['agent_guard.{name}'] is new else 'other')\n"
    )
    assert done.returncode == 0, done.stderr
    assert f"warned: agent_guard.{name} moved to agent_guard.engine.{name}" in done.stdout
    assert done.stdout.strip().endswith("same")


def test_old_paths_keep_private_names_for_code_that_reached_in() -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from agent_guard.guard import Guard, ModelCall, _Plan  # noqa: F401
        from agent_guard.usage import usd_to_nano
    from agent_guard.engine.guard import Guard as EngineGuard

    assert Guard is EngineGuard
    assert usd_to_nano("0.000000001") == 1
