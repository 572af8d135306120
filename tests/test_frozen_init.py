"""The hot path's frozen dataclasses built by agent_guard._frozen.fast_init behave as
the dataclass's own __init__ would: defaults, factories, validation, frozen, replace,
pickling."""

from __future__ import annotations

import copy
import dataclasses
import pickle

import pytest

from agent_guard._frozen import fast_init
from agent_guard.engine.admission import ModelCall
from agent_guard.engine.records import CallRecord
from agent_guard.engine.usage import MalformedUsage, Usage
from agent_guard.ledger.base import Reservation, Settlement


@dataclasses.dataclass(frozen=True, slots=True)
class _Plain:
    a: int
    b: str = "b"
    c: list[int] = dataclasses.field(default_factory=list)


@fast_init
@dataclasses.dataclass(frozen=True, slots=True)
class _Fast:
    a: int
    b: str = "b"
    c: list[int] = dataclasses.field(default_factory=list)


@pytest.mark.parametrize("args,kwargs", [((1,), {}), ((1, "x"), {}), ((), {"a": 2, "c": [3]}),
                                         ((1,), {"b": "y", "c": [1, 2]})])
def test_same_fields_as_the_dataclass_init(args, kwargs) -> None:
    assert dataclasses.astuple(_Fast(*args, **kwargs)) == dataclasses.astuple(
        _Plain(*args, **kwargs))


def test_a_factory_default_is_new_per_object_and_errors_match() -> None:
    assert _Fast(1).c is not _Fast(1).c
    with pytest.raises(TypeError):
        _Fast()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        _Fast(1, d=2)  # type: ignore[call-arg]
    with pytest.raises(dataclasses.FrozenInstanceError):
        _Fast(1).a = 2  # type: ignore[misc]


def test_only_frozen_slotted_dataclasses() -> None:
    with pytest.raises(TypeError):
        fast_init(dataclasses.dataclass(slots=True)(type("X", (), {"__annotations__": {"a": int}})))


def test_engine_objects_keep_their_behaviour() -> None:
    usage = Usage(10, 5, reasoning_tokens=2)
    assert usage == Usage(10, 5, 0, 0, 2) and hash(usage) == hash(Usage(10, 5, 0, 0, 2))
    assert dataclasses.replace(usage, input_tokens=20).input_tokens == 20
    assert pickle.loads(pickle.dumps(usage)) == usage == copy.deepcopy(usage)
    with pytest.raises(MalformedUsage):
        Usage(1, 2, cache_read_tokens=5)  # __post_init__ still validates
    call = ModelCall(session="s", model="m")
    assert call.attributes == {} and call.params == {} and call.attributes is not ModelCall(
        session="s", model="m").attributes
    record = CallRecord(session="s", run_id=None, model="m", provider=None, usage=usage,
                        cost_nano=1, reserved_nano=2, usage_estimated=False, outcome="ok",
                        started_at=0.0, ended_at=1.0)
    assert len(record.record_id) == 32 and record.tags == ()
    assert pickle.loads(pickle.dumps(record)) == record
    assert Reservation("r", ("a",), {"usd_nano": 1}, 5.0).id == "r"
    assert not Settlement(False) and Settlement(True).spent == {}


def test_an_object_is_of_its_own_class_and_a_subclass_keeps_its_class() -> None:
    """Fields are filled in as a plain twin class's (then the class is set back): the
    object ends as the class constructed, a subclass's included, and stays frozen."""

    class Sub(_Fast):
        __slots__ = ()

    for cls in (_Fast, Sub):
        obj = cls(1, "x", [2])
        assert type(obj) is cls
        assert (obj.a, obj.b, obj.c) == (1, "x", [2])
        with pytest.raises(dataclasses.FrozenInstanceError):
            obj.a = 2  # type: ignore[misc]
    for cls in (Usage, Reservation, CallRecord, ModelCall):
        assert "_twin" in cls.__init__.__code__.co_names  # the twin path is taken


def test_a_factory_that_raises_leaves_the_class_as_it_was() -> None:
    def boom() -> list[int]:
        raise RuntimeError("boom")

    @fast_init
    @dataclasses.dataclass(frozen=True, slots=True)
    class Failing:
        a: int
        c: list[int] = dataclasses.field(default_factory=boom)

    obj = object.__new__(Failing)
    with pytest.raises(RuntimeError):
        Failing.__init__(obj, 1)
    assert type(obj) is Failing


@pytest.mark.parametrize("args,kwargs", [((1,), {}), ((1, "x"), {}), ((), {"a": 2, "c": [3]}),
                                         ((1,), {"b": "y", "c": [1, 2]})])
def test_the_fields_maker_builds_what_init_builds(args, kwargs) -> None:
    """fields_maker(cls) takes __init__'s parameters and defaults and builds an equal,
    frozen object of the class itself, only without __post_init__."""
    from agent_guard._frozen import fields_maker

    made = fields_maker(_Fast)(*args, **kwargs)
    assert type(made) is _Fast and made == _Fast(*args, **kwargs)
    assert dataclasses.astuple(made) == dataclasses.astuple(_Plain(*args, **kwargs))
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.a = 2  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(made)) == made
    assert fields_maker(_Fast)(1).c is not fields_maker(_Fast)(1).c
    with pytest.raises(TypeError):
        fields_maker(_Fast)()


def test_the_engine_objects_made_by_their_fields_maker_equal_their_init() -> None:
    """The hot path's Usage (counts valid by construction), Admission and CallRecord."""
    from agent_guard._frozen import fields_maker
    from agent_guard.engine.admission import Admission

    assert fields_maker(Usage)(10, 5) == Usage(10, 5)
    assert fields_maker(Usage)(1, 2, 5) != Usage(1, 2)  # no validation: caller's duty
    reservation = Reservation("r", ("session:s",), {"usd_nano": 1}, 5.0)
    call = ModelCall(session="s", model="m")
    fields = (call, reservation, None, 10, 20, 30, False, 1.0, (), {}, False)
    assert fields_maker(Admission)(*fields) == Admission(*fields)
    record = (("s", None, "m", None, Usage(1, 2), 1, 2, False, "ok", 0.0, 1.0, False, 0, 5,
               None, (), None, None, "model", None, {}, ("session:s",), "rid"))
    assert fields_maker(CallRecord)(*record) == CallRecord(*record)
