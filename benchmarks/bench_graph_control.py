"""What a refusal does to a run, per graph shape: paid calls, outcome, history.

    python benchmarks/bench_graph_control.py

The graph-control rows, against the local OpenAI-compatible server (which refuses a
history with unanswered tool calls, as OpenAI does) with a reply script that never
ends the agent by itself. ``paid`` counts the requests the server answered during
the run; ``history`` sends the thread's messages once more to the server. The
recursion limit is 60 so that a run that does not stop ends quickly.
"""

from __future__ import annotations

import logging

from langgraph.checkpoint.memory import InMemorySaver
from langgraph.types import Command

from agent_guard import Limits, guarded_graph
from agent_guard.testing import FakeOpenAIServer
from tests import test_graph_control_matrix as shapes

ROWS = [
    ("agent", "create_agent, max_tool_calls=3, end", Limits(max_tool_calls=3), "end"),
    ("react", "ToolNode ReAct, max_repeats=3, end", Limits(max_repeats=3), "end"),
    ("loop", "loop without messages, max_model_calls=7, end", Limits(max_model_calls=7),
     "end"),
    ("agent", "create_agent, max_tool_calls=3, interrupt+stop", Limits(max_tool_calls=3),
     "stop"),
    ("subgraph", "sub-agent as a node, max_steps=5, end", Limits(max_steps=5), "end"),
]


def main() -> None:
    logging.disable(logging.WARNING)
    with FakeOpenAIServer() as server:
        for shape, label, limits, action in ROWS:
            server.replies = shapes.script(repeat=shape == "react")
            server.reset()
            app = guarded_graph(shapes.SHAPES[shape](server, shape == "react"), limits=limits,
                                on_exceed="interrupt" if action == "stop" else "end",
                                checkpointer=InMemorySaver())
            cfg = {"configurable": {"thread_id": label}, "recursion_limit": 60}
            try:
                out = app.invoke(shapes.inputs_for_shape(shape), cfg)
                if action == "stop":
                    out = app.invoke(Command(resume={"stop": True}), cfg)
                outcome = "paused" if out.get("__interrupt__") else "ended"
            except Exception as exc:  # what the caller would see
                outcome = type(exc).__name__
            paid = server.request_count
            state = app.get_state(cfg).values
            history = "-"
            if "messages" in state:
                try:
                    shapes.assert_history_accepted(server, app, cfg, shape)
                    history = "accepted"
                except Exception as exc:
                    history = type(exc).__name__
            print(f"{label:48s} paid={paid:3d}  {outcome:26s} history={history}")


if __name__ == "__main__":
    main()
