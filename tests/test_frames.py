"""Frame specs (contract.md 3): grammar, canonical form, chunking, cnode form."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cio_worker.errors import CioError, FrameSpecError
from cio_worker.job.frames import FrameSet, chunk_count

frame_sets = st.sets(st.integers(-300, 300), min_size=1, max_size=60).map(FrameSet.of)


# -- the grammar, by example ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "frames"),
    [
        ("7", [7]),
        ("1-5", [1, 2, 3, 4, 5]),
        ("1-10x3", [1, 4, 7, 10]),
        ("1-10x4", [1, 5, 9]),
        ("-5--1", [-5, -4, -3, -2, -1]),
        ("-1-5x2", [-1, 1, 3, 5]),
        ("-3", [-3]),
        ("5-1", [1, 2, 3, 4, 5]),
        ("-1--5", [-5, -4, -3, -2, -1]),
        ("9-1x4", [1, 5, 9]),
        ("1,3,5", [1, 3, 5]),
        ("1 3 5", [1, 3, 5]),
        ("1, 3 ,5", [1, 3, 5]),
        ("1  3", [1, 3]),
        ("1-3,2-4", [1, 2, 3, 4]),
        ("5,1,3,1", [1, 3, 5]),
        ("0", [0]),
    ],
)
def test_parse_examples(spec: str, frames: list[int]) -> None:
    assert list(FrameSet.parse(spec)) == frames


@pytest.mark.parametrize(
    ("frames", "canonical"),
    [
        ({1, 5}, "1-5x4"),
        ({2, 9, 20}, "2-9x7,20"),
        (set(range(1, 11)), "1-10"),
        ({1, 2, 3, 5, 7, 9}, "1-3,5-9x2"),
        ({-5, -4, -3, -2, -1}, "-5--1"),
        ({-1, 1, 3, 5}, "-1-5x2"),
        ({4}, "4"),
        (set(), ""),
    ],
)
def test_canonical_examples(frames: set[int], canonical: str) -> None:
    assert FrameSet.of(frames).canonical() == canonical
    assert str(FrameSet.of(frames)) == canonical


def test_two_frames_print_as_two_frames_not_a_range() -> None:
    fs = FrameSet.parse("1,5")
    assert fs.canonical() == "1-5x4"
    assert len(FrameSet.parse(fs.canonical())) == 2


@pytest.mark.parametrize(
    ("spec", "cnode"),
    [
        ("-5--1", "-5:-1"),  # the old client's string replacement made this ':5::1'
        ("-1-5x2", "-1:5%2"),
        ("-7--3x2", "-7:-3%2"),
        ("5-8", "5:8"),
        ("5-7x2", "5:7%2"),
        ("7-9x2,20", "7:9%2;20"),
        ("9-13x2", "9:13%2"),
        ("3", "3"),
        ("-10--8,-2", "-10:-8;-2"),
    ],
)
def test_cnode_form_is_built_from_numbers(spec: str, cnode: str) -> None:
    fs = FrameSet.parse(spec)
    assert fs.cnode() == cnode
    assert FrameSet.parse_cnode(cnode) == fs


def test_cnode_form_of_empty_set_is_an_error() -> None:
    with pytest.raises(FrameSpecError, match="empty"):
        FrameSet().cnode()


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("", "empty"),
        ("   ", "empty"),
        (",1-5", "separator"),
        ("1-5,", "separator"),
        (" 1-5", "separator"),
        ("1-5 ", "separator"),
        ("1,,5", "empty block"),
        ("5x2", "step needs a range"),
        ("1-10x0", "at least 1"),
        ("1-10x02", "leading zeros"),
        ("1:10", "cnode"),
        ("1-10%2", "cnode"),
        ("abc", "expected N, N-M or N-MxS"),
        ("1-", "expected N, N-M or N-MxS"),
        ("1--", "expected N, N-M or N-MxS"),
        ("1-5x", "expected N, N-M or N-MxS"),
        ("1-5x-2", "expected N, N-M or N-MxS"),
        ("1.5", "expected N, N-M or N-MxS"),
        ("+3", "expected N, N-M or N-MxS"),
        ("1;5", "cnode"),
        ("\u0661-\u0665", "expected N, N-M or N-MxS"),  # Arabic-Indic digits are not frames
        ("0-100000000", "more than"),
    ],
)
def test_rejected_specs_say_what_is_wrong(spec: str, says: str) -> None:
    with pytest.raises(FrameSpecError, match=says) as info:
        FrameSet.parse(spec)
    assert isinstance(info.value, CioError)
    assert info.value.code == "bad_frames"


def test_non_text_spec_is_rejected() -> None:
    with pytest.raises(FrameSpecError, match="must be text"):
        FrameSet.parse(5)  # type: ignore[arg-type]


def test_parse_optional_empty_is_empty_set() -> None:
    assert FrameSet.parse_optional("") == FrameSet()
    assert FrameSet.parse_optional(None) == FrameSet()
    assert FrameSet.parse_optional("3-4") == FrameSet.of([3, 4])
    with pytest.raises(FrameSpecError):
        FrameSet.parse_optional("3:4")


@pytest.mark.parametrize("spec", ["", "1;;2", "a", "1-5", "1:5x2", "1:5%0", "\u0661"])
def test_rejected_cnode_specs(spec: str) -> None:
    with pytest.raises(FrameSpecError):
        FrameSet.parse_cnode(spec)


# -- chunking ---------------------------------------------------------------------------------


def test_chunk_examples() -> None:
    frames = FrameSet.parse("1-10")
    assert [c.canonical() for c in frames.chunks(3)] == ["1-3", "4-6", "7-9", "10"]
    assert [c.canonical() for c in frames.chunks(0)] == [str(f) for f in range(1, 11)]
    assert [c.canonical() for c in frames.chunks(-4)] == [str(f) for f in range(1, 11)]
    assert [c.canonical() for c in frames.chunks(50)] == ["1-10"]
    assert [c.canonical() for c in FrameSet.parse("1-20x5").chunks(2)] == ["1-6x5", "11-16x5"]
    assert FrameSet().chunks(3) == []


@pytest.mark.parametrize(
    ("count", "size", "chunks"),
    [(10, 3, 4), (10, 5, 2), (10, 10, 1), (10, 11, 1), (10, 0, 10), (10, -1, 10), (1, 1, 1), (0, 5, 0), (7, 2, 4)],
)
def test_chunk_count_is_ceil_of_clamped_size(count: int, size: int, chunks: int) -> None:
    assert chunk_count(count, size) == chunks
    frames = FrameSet.of(range(count))
    assert len(frames.chunks(size)) == chunks


def test_intersection_and_difference() -> None:
    a = FrameSet.parse("1-10")
    b = FrameSet.parse("5-15x2")
    assert a.intersect(b).canonical() == "5-9x2"
    assert (a & b) == a.intersect(b)
    assert a.difference(b).canonical() == "1-4,6-10x2"
    assert (a - b) == a.difference(b)
    assert (a | b).canonical() == "1-11,13-15x2"  # greedy from the first frame
    assert a.intersect(FrameSet.parse("20-30")) == FrameSet()
    assert not a.intersect(FrameSet.parse("20-30"))
    assert 5 in a and 11 not in a


def test_first_and_last() -> None:
    fs = FrameSet.parse("-3,8,2")
    assert (fs.first, fs.last) == (-3, 8)
    with pytest.raises(FrameSpecError, match="no first frame"):
        _ = FrameSet().first
    with pytest.raises(FrameSpecError, match="no last frame"):
        _ = FrameSet().last


# -- properties ----------------------------------------------------------------------------------


@given(frame_sets)
def test_canonical_parses_back_to_the_same_frames(fs: FrameSet) -> None:
    assert FrameSet.parse(fs.canonical()) == fs


@given(frame_sets)
def test_cnode_form_parses_back_to_the_same_frames(fs: FrameSet) -> None:
    assert FrameSet.parse_cnode(fs.cnode()) == fs


@given(frame_sets, st.integers(-5, 80))
def test_chunks_partition_the_frames_in_order(fs: FrameSet, size: int) -> None:
    chunks = fs.chunks(size)
    clamped = max(1, min(size, len(fs)))
    assert [f for c in chunks for f in c] == list(fs)
    assert all(len(c) == clamped for c in chunks[:-1])
    assert 1 <= len(chunks[-1]) <= clamped
    assert len(chunks) == math.ceil(len(fs) / clamped) == chunk_count(len(fs), size)
    for chunk in chunks:
        assert FrameSet.parse_cnode(chunk.cnode()) == chunk
        assert FrameSet.parse(chunk.canonical()) == chunk


# A simple independent model of the grammar: blocks as numbers, printed with random separators.
blocks = st.one_of(
    st.tuples(st.just("single"), st.integers(-60, 60), st.just(0), st.just(1)),
    st.tuples(st.just("range"), st.integers(-60, 60), st.integers(-60, 60), st.just(1)),
    st.tuples(st.just("step"), st.integers(-60, 60), st.integers(-60, 60), st.integers(1, 12)),
)
separators = st.sampled_from([",", " ", ", ", " ,", " , ", "  ", "\t", ",\t"])


def _model(block: tuple[str, int, int, int]) -> set[int]:
    kind, a, b, step = block
    if kind == "single":
        return {a}
    low, high = min(a, b), max(a, b)
    out, frame = set(), low
    while frame <= high:
        out.add(frame)
        frame += step
    return out


def _text(block: tuple[str, int, int, int]) -> str:
    kind, a, b, step = block
    if kind == "single":
        return str(a)
    if kind == "range":
        return f"{a}-{b}"
    return f"{a}-{b}x{step}"


@settings(max_examples=200)
@given(st.lists(st.tuples(blocks, separators), min_size=1, max_size=8))
def test_generated_specs_match_the_model(parts: list) -> None:
    spec = ""
    expected: set[int] = set()
    for i, (block, separator) in enumerate(parts):
        spec += (separator if i else "") + _text(block)
        expected |= _model(block)
    fs = FrameSet.parse(spec)
    assert list(fs) == sorted(expected)
    assert FrameSet.parse(fs.canonical()) == fs


@pytest.mark.parametrize("spec", ["1-" + "9" * 5000, "1234567890", "1-10x" + "1" * 20])
def test_absurdly_long_numbers_are_a_clear_error(spec: str) -> None:
    with pytest.raises(FrameSpecError, match="more than 9 digits"):
        FrameSet.parse(spec)
    with pytest.raises(FrameSpecError, match="more than 9 digits"):
        FrameSet.parse_cnode(spec.replace("-", ":").replace("x", "%"))
