from __future__ import annotations

from collections.abc import Sequence

from hypothesis import given
from hypothesis import strategies as st

from trimperor.core.errors import ConfigError
from trimperor.core.model import Remove, Snapshot, SourceProblem, Upsert, VassalDocument
from trimperor.core.reconcile import Notice, Registry, Reload, Start, Stop, Unsupported


def parse(doc: VassalDocument) -> str:
    assert doc.text is not None
    if doc.text.startswith("broken"):
        raise ConfigError(f"{doc.name}:1: broken")
    if doc.text.startswith("uwsgi"):
        raise Unsupported(f"{doc.name}: unsupported")
    return doc.text


def doc(name: str, text: str, version: str = "1", source: str = "a") -> VassalDocument:
    return VassalDocument(name=name, source=source, version=version, text=text)


def kinds(actions: Sequence[object]) -> list[str]:
    return [type(a).__name__ for a in actions]


def test_new_changed_removed() -> None:
    reg: Registry[str] = Registry(parse)
    assert reg.handle(Upsert(doc("x.ini", "v1"))) == [Start("x.ini", "a", "1", "v1")]
    assert reg.handle(Upsert(doc("x.ini", "v1"))) == []
    assert reg.handle(Upsert(doc("x.ini", "v1", version="2"))) == [Reload("x.ini", "a", "2", "v1")]
    assert reg.handle(Remove("a", "x.ini")) == [Stop("x.ini")]
    assert reg.handle(Remove("a", "x.ini")) == []
    assert reg.running() == {}


def test_broken_new_file_starts_nothing_then_fixed_starts() -> None:
    reg: Registry[str] = Registry(parse)
    [notice] = reg.handle(Upsert(doc("x.ini", "broken")))
    assert isinstance(notice, Notice)
    assert notice.event == "config.invalid"
    assert "x.ini:1" in notice.message
    assert reg.handle(Upsert(doc("x.ini", "good", version="2"))) == [
        Start("x.ini", "a", "2", "good")
    ]


def test_running_vassal_keeps_last_good_config_when_file_breaks() -> None:
    reg: Registry[str] = Registry(parse)
    reg.handle(Upsert(doc("x.ini", "good")))
    [notice] = reg.handle(Upsert(doc("x.ini", "broken", version="2")))
    assert isinstance(notice, Notice)
    assert notice.event == "config.broken"
    assert reg.running() == {"x.ini": "good"}
    assert reg.handle(Upsert(doc("x.ini", "better", version="3"))) == [
        Reload("x.ini", "a", "3", "better")
    ]


def test_unreadable_document_is_an_error_not_a_crash() -> None:
    reg: Registry[str] = Registry(parse)
    bad = VassalDocument("x.ini", "a", "1", None, error="Permission denied")
    [notice] = reg.handle(Upsert(bad))
    assert isinstance(notice, Notice)
    assert "Permission denied" in notice.message


def test_unsupported_is_logged_and_left_alone() -> None:
    reg: Registry[str] = Registry(parse)
    [notice] = reg.handle(Upsert(doc("x.ini", "uwsgi")))
    assert isinstance(notice, Notice)
    assert notice.event == "vassal.unsupported"
    assert reg.handle(Upsert(doc("x.ini", "uwsgi"))) == []
    assert reg.running() == {}


def test_first_source_keeps_the_name_until_released() -> None:
    reg: Registry[str] = Registry(parse)
    assert kinds(reg.handle(Upsert(doc("x.ini", "from-a")))) == ["Start"]
    [notice] = reg.handle(Upsert(doc("x.ini", "from-b", source="b")))
    assert isinstance(notice, Notice)
    assert notice.event == "vassal.name_taken"
    assert reg.handle(Upsert(doc("x.ini", "from-b", version="2", source="b"))) == []
    assert reg.handle(Remove("b", "nothing.ini")) == []
    actions = reg.handle(Remove("a", "x.ini"))
    assert actions == [Stop("x.ini"), Start("x.ini", "b", "2", "from-b")]
    assert reg.owner("x.ini") == "b"


def test_snapshot_removes_what_is_missing_and_problems_touch_nothing() -> None:
    reg: Registry[str] = Registry(parse)
    reg.handle(Snapshot("a", (doc("x.ini", "x"), doc("y.ini", "y"))))
    assert reg.handle(SourceProblem("a", "database down"))[0] == Notice(
        "source.problem", "", "a", "database down"
    )
    assert set(reg.running()) == {"x.ini", "y.ini"}
    assert reg.handle(Snapshot("a", (doc("y.ini", "y"),))) == [Stop("x.ini")]


names = st.sampled_from(["a.ini", "b.xml", "c.yaml", "d.json"])
texts = st.sampled_from(["one", "two", "broken", "uwsgi"])
versions = st.sampled_from(["1", "2", "3"])
sources = st.sampled_from(["s1", "s2"])
events = st.one_of(
    st.builds(lambda n, t, v, s: Upsert(doc(n, t, v, s)), names, texts, versions, sources),
    st.builds(Remove, sources, names),
    st.builds(
        lambda s, ds: Snapshot(s, tuple(doc(n, t, v, s) for n, t, v in ds)),
        sources,
        st.lists(st.tuples(names, texts, versions), unique_by=lambda x: x[0], max_size=4),
    ),
)


@given(st.lists(events, max_size=30))
def test_actions_keep_a_consistent_running_set(evs: list[Upsert | Remove | Snapshot]) -> None:
    """Replaying the actions gives exactly the registry's running set, and a
    vassal is never started twice or reloaded/stopped when not running."""
    reg: Registry[str] = Registry(parse)
    running: dict[str, str] = {}
    for ev in evs:
        for action in reg.handle(ev):
            if isinstance(action, Start):
                assert action.name not in running
                running[action.name] = action.spec
            elif isinstance(action, Reload):
                assert action.name in running
                running[action.name] = action.spec
            elif isinstance(action, Stop):
                assert running.pop(action.name, None) is not None
        assert running == reg.running()
        for name in running:
            assert reg.owner(name) is not None


@given(st.lists(events, max_size=20), sources)
def test_resending_a_snapshot_is_idempotent(evs: list[Upsert | Remove | Snapshot], s: str) -> None:
    reg: Registry[str] = Registry(parse)
    for ev in evs:
        reg.handle(ev)
    snap = Snapshot(s, tuple(doc(n, "one", "9", s) for n in sorted(reg.names(s))))
    reg.handle(snap)
    assert [a for a in reg.handle(snap) if not isinstance(a, Notice)] == []
