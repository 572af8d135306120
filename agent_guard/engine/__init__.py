"""The framework-free engine: what a guard decides, with no LangChain or LangGraph import.

Nothing is imported here, so ``import agent_guard.engine.usage`` (done by the price book)
does not load the guard; import from the modules:

- :mod:`.guard` -- ``Guard``, the orchestration: admit, settle, refuse, count.
- :mod:`.limits` -- ``Limits``: the caps of one session.
- :mod:`.budgets` -- ``Budgets``: caps per user, team, feature or globally, per window.
- :mod:`.usage` -- ``Usage``, token counts, and money as integer nano-USD.
- :mod:`.records` -- ``CallRecord``, ``SessionUsage``: what every call leaves.
- :mod:`.keeper` -- the lease keeper that renews and ends reservations of abandoned calls.
"""
