"""The compact id set and map behave like a Python set and dict of strings."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pipeline.idset import IdMap, IdSet


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


def test_many_ids_cost_about_eight_bytes_each() -> None:
    """200,000 ids are kept as sorted 64-bit keys plus one small table, not as Python objects."""
    ids = IdSet(f"row-{i}" for i in range(200_000))
    assert len(ids) == 200_000
    stored = sum(len(run) for run in ids._runs) + len(ids._recent)
    assert stored == 200_000
    assert sum(run.itemsize * len(run) for run in ids._runs) <= 8 * 200_000
    assert all(list(run) == sorted(run) for run in ids._runs)
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
    compact, repeats = IdSet.bulk(ids)
    assert repeats == len(ids) - len(set(ids))
    assert len(compact) == len(set(ids))
    assert all(row_id in compact for row_id in ids)
    assert "id-1" not in compact
    assert compact.add("id-1") and not compact.add(ids[0] if ids else "id-1")
