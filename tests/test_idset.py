"""The compact id set and map behave like a Python set and dict of strings."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pipeline.input.ids import IdMap, IdSet


@given(st.lists(st.text(max_size=12), max_size=3000))
def test_idset_matches_a_python_set(ids: list[str]) -> None:
    """add() reports new ids exactly like set membership, across table growth."""
    compact, reference = IdSet(), set()
    for row_id in ids:
        assert compact.add(row_id) == (row_id not in reference)
        reference.add(row_id)
    assert len(compact) == len(reference)
    assert all(row_id in compact for row_id in reference)
    assert "never-added-\x00" not in compact or "never-added-\x00" in reference


@given(st.lists(st.tuples(st.text(max_size=8), st.integers(0, 2**32 - 1)), max_size=3000))
def test_idmap_matches_a_dict(pairs: list[tuple[str, int]]) -> None:
    """set()/get() behave like a dict, the last value winning, across table growth."""
    compact, reference = IdMap(), {}
    for key, value in pairs:
        compact.set(key, value)
        reference[key] = value
    assert len(compact) == len(reference)
    assert all(compact.get(k) == v for k, v in reference.items())
    assert compact.get("\x01absent") == reference.get("\x01absent")


@given(st.lists(st.tuples(st.integers(0, 300), st.integers(1, 0xFFFF)), max_size=2000), st.booleans())
def test_tags_are_kept_beside_ids(pairs: list[tuple[int, int]], bulk: bool) -> None:
    """Each id keeps the tag it was first added with (or, built in bulk, one of its tags); absent ids have none."""
    first: dict[str, int] = {}
    for n, tag in pairs:
        first.setdefault(f"id{n}", tag)
    if bulk:
        made, _ = IdSet.bulk((f"id{n}", tag) for n, tag in pairs)
        seen: dict[str, set[int]] = {}
        for n, tag in pairs:
            seen.setdefault(f"id{n}", set()).add(tag)
        assert all(made.tag_of(k) in tags for k, tags in seen.items())
    else:
        made = IdSet(seal_at=16, run_cap=128)
        for n, tag in pairs:
            made.add(f"id{n}", tag)
        assert all(made.tag_of(k) == tag for k, tag in first.items())
    assert made.tag_of("absent") is None


def test_many_ids_cost_about_eight_bytes_each() -> None:
    """200,000 ids are kept as sorted 64-bit keys plus one small table, not as Python objects."""
    ids = IdSet(f"row-{i}" for i in range(200_000))
    assert len(ids) == 200_000
    stored = sum(len(run) for run in ids._runs) + len(ids._recent)
    assert stored == 200_000
    assert len(ids._recent) < 200_000 // 10, "the table of recent ids stays small: the rest is sealed into runs"
    assert sum(run.keys.itemsize * len(run) + run.tags.itemsize * len(run) for run in ids._runs) <= 10 * 200_000
    assert all(list(run.keys) == sorted(run.keys) for run in ids._runs)
    assert "row-199999" in ids and "row-200000" not in ids


@given(st.lists(st.integers(0, 5000), max_size=3000), st.sampled_from([8, 64]))
def test_idset_with_tiny_runs_matches_a_python_set(numbers: list[int], recent: int) -> None:
    """With runs sealed every few ids (so merging happens often), the set still matches a Python set."""
    compact, reference = IdSet(seal_at=recent, run_cap=recent * 8), set()
    for n in numbers:
        row_id = f"id{n}"
        assert compact.add(row_id) == (row_id not in reference)
        reference.add(row_id)
    assert len(compact) == len(reference)
    assert all(f"id{n}" in compact for n in numbers)


@given(st.lists(st.integers(0, 400), max_size=2000))
def test_bulk_build_matches_a_python_set_and_counts_repeats(numbers: list[int]) -> None:
    """Building from many ids at once (resuming a sink) gives the same membership and counts every repeat."""
    ids = [f"id{n}" for n in numbers]
    compact, repeats = IdSet.bulk((row_id, 0) for row_id in ids)
    assert repeats == len(ids) - len(set(ids))
    assert len(compact) == len(set(ids))
    assert all(row_id in compact for row_id in ids)
    assert "id-1" not in compact
    assert compact.add("id-1") and not compact.add(ids[0] if ids else "id-1")
