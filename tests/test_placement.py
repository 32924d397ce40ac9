"""Placement: rendezvous hashing over the live nodes (pure; property tests)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trimperor.core.errors import ConfigError
from trimperor.core.model import VassalDocument
from trimperor.core.placement import Node, Placement, assign, owners, parse_placement, score
from trimperor.core.vassalspec import NativeSpec, UwsgiSpec, build_spec

node_names = st.text(alphabet="abcdefgh0123-", min_size=1, max_size=6)
labels = st.lists(
    st.tuples(st.sampled_from(["zone", "disk"]), st.sampled_from(["a", "b", "ssd"])),
    max_size=2,
    unique_by=lambda kv: kv[0],
).map(tuple)
nodes_st = st.lists(st.builds(Node, node_names, labels), max_size=8, unique_by=lambda n: n.name)
vassal_names = st.text(min_size=1, max_size=12)
placements = st.builds(
    Placement,
    st.one_of(st.none(), st.integers(1, 4)),
    st.one_of(st.none(), st.sampled_from(["a*", "*1*", "b?"])),
    st.one_of(st.just(()), st.just((("zone", "a"),)), st.just((("disk", "ssd"),))),
)


def matching(p: Placement, nodes: list[Node]) -> set[str]:
    import fnmatch

    return {
        n.name
        for n in nodes
        if (p.node is None or fnmatch.fnmatchcase(n.name, p.node))
        and all(dict(n.labels).get(k) == v for k, v in p.labels)
    }


@given(vassal_names, placements, nodes_st, st.randoms())
def test_deterministic_and_order_free(
    name: str, p: Placement, nodes: list[Node], rnd: random.Random
) -> None:
    shuffled = list(nodes)
    rnd.shuffle(shuffled)
    assert owners(name, p, nodes) == owners(name, p, shuffled)


@given(vassal_names, placements, nodes_st)
def test_n_distinct_matching_owners_or_all(name: str, p: Placement, nodes: list[Node]) -> None:
    got = owners(name, p, nodes)
    ok = matching(p, nodes)
    assert len(set(got)) == len(got)
    assert set(got) <= ok
    if p.copies is None:
        assert set(got) == ok
    else:
        assert len(got) == min(p.copies, len(ok))


@given(st.lists(vassal_names, max_size=30, unique=True), placements, nodes_st, node_names)
def test_a_joining_node_moves_only_what_it_takes(
    names: list[str], p: Placement, nodes: list[Node], new: str
) -> None:
    if any(n.name == new for n in nodes):
        return
    joiner = Node(new, (("zone", "a"),))
    before = assign(dict.fromkeys(names, p), nodes)
    after = assign(dict.fromkeys(names, p), [*nodes, joiner])
    for name in names:
        old, now = set(before[name]), set(after[name])
        if old == now:
            continue
        # The only change is the joiner coming in (and, when full, one owner going).
        assert new in now
        assert now - {new} <= old
        assert len(old - now) <= 1


@given(st.lists(vassal_names, max_size=30, unique=True), placements, nodes_st, st.data())
def test_a_leaving_node_moves_only_its_own(
    names: list[str], p: Placement, nodes: list[Node], data: st.DataObject
) -> None:
    if not nodes:
        return
    gone = data.draw(st.sampled_from(nodes))
    rest = [n for n in nodes if n != gone]
    before = assign(dict.fromkeys(names, p), nodes)
    after = assign(dict.fromkeys(names, p), rest)
    for name in names:
        if gone.name not in before[name]:
            assert after[name] == before[name]
        else:
            assert set(before[name]) - {gone.name} <= set(after[name])
            if p.copies == 1 and after[name]:
                # The new owner is the one that ranked second.
                ranked = sorted(matching(p, nodes), key=lambda n: (score(name, n), n))
                assert after[name] == (ranked[-2],)


def test_churn_when_a_fourth_node_joins_is_about_a_quarter() -> None:
    names = [f"site{i}.ini" for i in range(1000)]
    three = [Node(f"host{i}") for i in range(3)]
    before = assign(dict.fromkeys(names, Placement()), three)
    after = assign(dict.fromkeys(names, Placement()), [*three, Node("host3")])
    moved = [n for n in names if before[n] != after[n]]
    assert all(after[n] == ("host3",) for n in moved)
    assert 0.18 < len(moved) / len(names) < 0.32
    shares = [sum(1 for n in names if before[n] == (h.name,)) for h in three]
    assert min(shares) > 250


# -- the keys ------------------------------------------------------------------------------


def parse(entries: dict[str, list[str]]) -> Placement:
    return parse_placement(lambda key: tuple(entries.get(key, ())), "x.ini")


def test_keys() -> None:
    assert parse({}) == Placement()
    assert parse({"placement": ["all"]}).copies is None
    p = parse(
        {
            "placement": ["2"],
            "node": ["web-*"],
            "node-label": ["zone=a", "disk = ssd"],
            "on-partition": ["keep"],
        }
    )
    assert p == Placement(2, "web-*", (("disk", "ssd"), ("zone", "a")), "keep")
    assert not p.fenced
    assert Placement().fenced
    assert not Placement(None).fenced
    assert Placement(None, on_partition="stop").fenced


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ({"placement": ["0"]}, "placement"),
        ({"placement": ["some"]}, "placement"),
        ({"node-label": ["zone"]}, "KEY=VALUE"),
        ({"on-partition": ["maybe"]}, "on-partition"),
    ],
)
def test_bad_keys(entries: dict[str, list[str]], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse(entries)


def doc(name: str, text: str) -> VassalDocument:
    return VassalDocument(name=name, source="s", version="1", text=text)


def test_native_and_uwsgi_vassals_carry_their_placement() -> None:
    native = build_spec(
        doc("a.ini", "[vassal]\ncommand = true\nplacement = all\nnode-label = zone=a\n"), {}
    )
    assert isinstance(native, NativeSpec)
    assert native.placement == Placement(None, None, (("zone", "a"),))
    uw = build_spec(doc("b.ini", "[uwsgi]\nmodule = x\n[fleet]\nplacement = 2\nnode = w*\n"), {})
    assert isinstance(uw, UwsgiSpec)
    assert uw.placement == Placement(2, "w*")
    yaml_uw = build_spec(doc("c.yaml", "uwsgi:\n  module: x\nfleet:\n  placement: all\n"), {})
    assert yaml_uw.placement.copies is None
    with pytest.raises(ConfigError, match="unknown key 'nodes'"):
        build_spec(doc("d.ini", "[uwsgi]\nmodule = x\n[fleet]\nnodes = 2\n"), {})
    with pytest.raises(ConfigError, match="in the vassal section"):
        build_spec(doc("e.ini", "[vassal]\ncommand = true\n[fleet]\nplacement = 2\n"), {})
