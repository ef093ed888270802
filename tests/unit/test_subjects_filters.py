from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent_os.amb.errors import ConfigError
from agent_os.amb.filters import compile_filter
from agent_os.amb.subjects import INDEXED_TOKENS, SubjectIndex, matches, validate_pattern, validate_subject
from tests.support.strings import LooseStr, SneakyStr


@pytest.mark.parametrize(
    ("pattern", "subject", "expected"),
    [
        ("a.b", "a.b", True),
        ("a.b", "a.c", False),
        ("a.*", "a.b", True),
        ("a.*", "a.b.c", False),
        ("a.*", "a", False),
        ("a.>", "a.b", True),
        ("a.>", "a.b.c", True),
        ("a.>", "a", False),
        ("*.b", "a.b", True),
        ("*", "a", True),
        (">", "a.b.c", True),
        ("a.*.c", "a.x.c", True),
        ("a.*.c", "a.x.d", False),
    ],
)
def test_matches(pattern: str, subject: str, expected: bool) -> None:
    assert matches(pattern, subject) is expected


@pytest.mark.parametrize("bad", ["", "a..b", ".a", "a.", "a b", "a.*", "a.>", "a*"])
def test_invalid_subjects(bad: str) -> None:
    with pytest.raises(ConfigError):
        validate_subject(bad)


@pytest.mark.parametrize("bad", ["", "a.>.b", "a*.b", "a.b>", "a..b"])
def test_invalid_patterns(bad: str) -> None:
    with pytest.raises(ConfigError):
        validate_pattern(bad)


token = st.text(alphabet="abc", min_size=1, max_size=2)


def reference(pattern: str, subject: str) -> bool:
    """An independent regex translation of the wildcard rules."""
    parts = [{"*": r"[^.]+", ">": r".+"}.get(tok, re.escape(tok)) for tok in pattern.split(".")]
    return re.fullmatch(r"\.".join(parts), subject) is not None


@given(
    st.lists(st.one_of(token, st.just("*")), min_size=1, max_size=4).map(".".join)
    | st.lists(token, min_size=0, max_size=3).map(lambda t: ".".join([*t, ">"])),
    st.lists(token, min_size=1, max_size=5).map(".".join),
)
def test_matches_agrees_with_a_regex_reference(pattern: str, subject: str) -> None:
    assert matches(pattern, subject) is reference(pattern, subject)


def test_dict_filter_conditions() -> None:
    f = compile_filter({"priority": ["high", "urgent"], "user.role": "admin", "size": lambda s: s > 10})
    assert f is not None
    assert f({"priority": "high", "user": {"role": "admin"}, "size": 11})
    assert not f({"priority": "low", "user": {"role": "admin"}, "size": 11})
    assert not f({"priority": "high", "user": {"role": "guest"}, "size": 11})
    assert not f({"priority": "high", "user": "admin", "size": 11})
    assert not f({"priority": "high", "user": {"role": "admin"}})
    assert not f(["not", "a", "dict"])


def test_predicate_filter_and_none() -> None:
    assert compile_filter(None) is None
    f = compile_filter(lambda m: m == 3)
    assert f is not None
    assert f(3)
    assert not f(4)


@pytest.mark.parametrize("bad", [{}, {"": 1}, {"a..b": 1}, "priority", 5])
def test_invalid_filters(bad: object) -> None:
    with pytest.raises(ConfigError):
        compile_filter(bad)  # type: ignore[arg-type]


# A small alphabet of tokens, so that random patterns and subjects often share prefixes. Long
# ones go past the tokens the index files by (INDEXED_TOKENS): those are checked whole.
def _pattern_strategy(tokens: list[str], most: int) -> st.SearchStrategy[str]:
    return st.builds(
        lambda parts, tail: ".".join(parts + ([">"] if tail else [])) or ">",
        st.lists(st.sampled_from(tokens), max_size=most),
        st.booleans(),
    )


_short = (
    _pattern_strategy(["a", "b", "c", "*"], 4),
    st.lists(st.sampled_from(["a", "b", "c", "d"]), min_size=1, max_size=5).map(".".join),
)
_long = (
    _pattern_strategy(["a", "b", "*"], INDEXED_TOKENS + 3),
    st.lists(st.sampled_from(["a", "b"]), min_size=1, max_size=INDEXED_TOKENS + 4).map(".".join),
)


@pytest.mark.parametrize("kinds", [_short, _long], ids=["short", "long"])
@given(data=st.data())
def test_subject_index_agrees_with_matches(
    kinds: tuple[st.SearchStrategy[str], st.SearchStrategy[str]], data: st.DataObject
) -> None:
    """The index finds exactly the values whose pattern matches, in the order they were added,
    also after removals (values are distinct objects: the same pattern may be filed twice)."""
    patterns = data.draw(st.lists(kinds[0], max_size=25))
    removed = data.draw(st.lists(st.integers(min_value=0, max_value=24), max_size=10))
    subjects = data.draw(st.lists(kinds[1], min_size=1, max_size=10))
    index: SubjectIndex[object] = SubjectIndex()
    filed = [(validate_pattern(p), object()) for p in patterns]
    for pattern, value in filed:
        index.add(pattern, value)
    gone = {i for i in removed if i < len(filed)}
    for i in gone:
        assert index.remove(*filed[i]) is True
        assert index.remove(*filed[i]) is False  # already gone
    kept = [entry for i, entry in enumerate(filed) if i not in gone]
    assert len(index) == len(kept)
    for subject in subjects:
        expected = [value for pattern, value in kept if matches(pattern, subject)]
        assert index.match(subject) == expected
    for pattern, value in kept:
        index.remove(pattern, value)
    assert index._root.empty(), "nothing left once every value is gone"


def test_subject_index_drops_emptied_branches() -> None:
    """Patterns that come and go (every client's reply inbox) leave no nodes behind."""
    index: SubjectIndex[str] = SubjectIndex()
    for i in range(100):
        index.add(f"_INBOX.c{i}.>", "inbox")
        index.add(f"agents.a{i}.*.x", "agent")
    index.add("agents.>", "all")
    for i in range(100):
        assert index.remove(f"_INBOX.c{i}.>", "inbox")
        assert index.remove(f"agents.a{i}.*.x", "agent")
    assert index.match("agents.a1.b.x") == ["all"]
    root = index._root
    assert root.children is not None
    assert list(root.children) == ["agents"]
    assert root.children["agents"].children is None
    assert not index.remove("agents.a1.*.x", "agent")  # a branch that is gone


def test_a_deep_pattern_costs_at_most_the_indexed_tokens_in_nodes() -> None:
    """A pattern of 500 tokens makes INDEXED_TOKENS nodes, not 500, and still matches whole."""
    index: SubjectIndex[str] = SubjectIndex()
    deep = ".".join(["t"] * 499 + ["*"])
    index.add(deep, "deep")
    nodes, node = 0, index._root
    while node.children:
        (node,) = node.children.values()
        nodes += 1
    assert nodes == INDEXED_TOKENS
    assert index.match(".".join(["t"] * 500)) == ["deep"]
    assert index.match(".".join(["t"] * 499)) == []
    assert index.remove(deep, "deep")
    assert index._root.empty()


def test_validate_subject_remembers_topics_but_not_reply_subjects() -> None:
    from agent_os.amb import subjects

    topic, reply = "remember.me.please", "_INBOX.abc.1f"
    assert validate_subject(topic) == topic
    assert validate_subject(reply) == reply
    assert topic in subjects.valid_subjects
    assert reply not in subjects.valid_subjects, "a reply subject, new for each request, is not kept"
    assert validate_subject("caf\u00e9.x") == "caf\u00e9.x"  # valid, not ASCII
    for bad in (["a"], {"a": 1}, None, 5, b"a.b", "a" * 1025, "_INBOX.a b", "_INBOX.*"):
        with pytest.raises(ConfigError):
            validate_subject(bad)  # type: ignore[arg-type]
    for i in range(5000):  # full: starts over, and stays bounded
        validate_subject(f"many.t{i}")
    assert len(subjects.valid_subjects) <= 4096


def test_a_str_subclass_is_checked_by_its_text_and_never_remembered() -> None:
    from agent_os.amb import subjects

    assert validate_subject(LooseStr("poison.me")) == "poison.me"
    with pytest.raises(ConfigError):
        validate_subject("poison me")  # equal to the subclass by its __eq__, still refused
    assert not any(type(s) is not str for s in subjects.valid_subjects)
    for text in ("a b", "a.*", "", "a..b", "x" * 1025, "_INBOX.a b"):
        with pytest.raises(ConfigError):
            validate_subject(SneakyStr(text))


def test_non_ascii_reply_subjects_are_checked_in_full_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # Their full check is slow; a request checks its reply subject a few times.
    from agent_os.amb import subjects

    calls = 0
    tokens = subjects._tokens

    def counted(text: str, what: str) -> list[str]:
        nonlocal calls
        calls += 1
        return tokens(text, what)

    monkeypatch.setattr(subjects, "_tokens", counted)
    for n in range(50):
        reply = f"_INBOX.caf\u00e9.{n:x}"
        for _ in range(4):
            assert validate_subject(reply) == reply
    assert calls == 50
    assert len(subjects._wide_replies) <= 256
    assert not any(s.startswith("_INBOX.") for s in subjects.valid_subjects)
