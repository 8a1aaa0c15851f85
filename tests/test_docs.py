"""The documentation stays true: a generated CLI reference, a short README, and links that lead somewhere."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from .helpers import ROOT, label, reviews, write_csv

README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_LIMIT = 12 * 1024
# Pages that quote other programs' flags at length: the benchmark scripts' and the real servers'.
OTHER_TOOLS_PAGES = {"benchmarks.md", "compat.md"}
# Flags of other tools that README and the other pages quote: mypy's, vLLM run_batch's, and pytest's (testing.md).
OTHER_TOOLS_FLAGS = {"--strict", "--max-model-len", "--served-model-name", "--durations", "--strict-markers"}

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def _cli_reference() -> ModuleType:
    path = ROOT / "scripts" / "cli_reference.py"
    spec = importlib.util.spec_from_file_location("cli_reference", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _flags() -> set[str]:
    """Every option string of every command and subcommand of `labelstream`, aliases included."""
    from pipeline.cli import build_parser  # noqa: PLC0415 - the CLI, not the library, is under test here

    module = _cli_reference()
    flags, pending = set(), [build_parser()]
    while pending:
        parser = pending.pop()
        pending += [child for _, _, child in module._subcommands(parser)]
        flags |= {flag for action in parser._actions for flag in action.option_strings}
    return flags - {"-h", "--help"}


def _prose(text: str) -> str:
    """Markdown without code blocks and code spans, where nothing is a link or a heading."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def anchors(text: str) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown page (a repeated heading gets -1, -2, ...)."""
    found: set[str] = set()
    for heading in _HEADING.findall(_FENCE.sub("", text)):
        words = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").strip().lower()
        slug = re.sub(r"[^\w\- ]", "", words).replace(" ", "-")
        candidate, n = slug, 0
        while candidate in found:
            n += 1
            candidate = f"{slug}-{n}"
        found.add(candidate)
    return found


def broken_links(page: Path) -> list[str]:
    """Each relative link of a page whose file, or whose anchor in that file, does not exist."""
    broken = []
    for target in _LINK.findall(_prose(page.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...: not ours to check offline
            continue
        path_part, _, anchor = target.partition("#")
        linked = (page.parent / path_part).resolve() if path_part else page
        if not linked.exists():
            broken.append(f"{page.name}: {target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked.read_text(encoding="utf-8")):
            broken.append(f"{page.name}: {target} (no heading with that anchor in {linked.name})")
    return broken


def test_cli_reference_is_what_the_parser_generates() -> None:
    """docs/cli.md is exactly what scripts/cli_reference.py makes from today's parser."""
    committed = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert committed == _cli_reference().render(), "docs/cli.md is stale: run `make docs` and commit it."


def test_cli_reference_names_every_flag_of_every_command() -> None:
    """Each option string of each (sub)command, aliases included, opens a flag entry of the reference."""
    text = _cli_reference().render()
    assert sorted(flag for flag in _flags() if f"`{flag} " not in text and f"`{flag}`" not in text) == []


def test_every_flag_the_docs_name_is_one_labelstream_has() -> None:
    """A `--flag` in README.md or a docs page (outside benchmark and compat pages) exists in some command's parser."""
    known = _flags() | OTHER_TOOLS_FLAGS
    unknown = [
        f"{page.name}: {flag}"
        for page in PAGES
        if page.name not in OTHER_TOOLS_PAGES
        for flag in sorted(set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", page.read_text(encoding="utf-8"))))
        if flag not in known
    ]
    assert unknown == [], "flags no command has (renamed? removed?):\n" + "\n".join(unknown)


def test_every_test_and_script_the_docs_cite_exists() -> None:
    """A cited `test_x.py::test_y` is defined in that test file, and a cited script is in scripts/."""
    missing = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for match in re.finditer(r"(?<![\w/.])(?:tests/(?:compat/)?)?(test_\w+\.py)(?:::(test_\w+))?", text):
            files = list((ROOT / "tests").rglob(match.group(1)))
            name = match.group(2)
            if not files or (name and not any(re.search(rf"def {name}\b", f.read_text("utf-8")) for f in files)):
                missing.append(f"{page.name}: {match.group(0)}")
        scripts = re.findall(r"(?<![\w.])(?:scripts/)?((?:bench|check)_\w+\.py|scripts/\w+\.(?:py|sh))", text)
        missing += [f"{page.name}: {s}" for s in scripts if not (ROOT / "scripts" / Path(s).name).exists()]
    assert missing == [], "cited but not there (renamed? moved?):\n" + "\n".join(missing)


def test_readme_is_at_most_12_kb() -> None:
    """README.md stays a front page (what it is, two commands, a first run, the library, links) of ≤ 12 KB."""
    size = len(README.read_bytes())
    assert size <= README_LIMIT, f"README.md is {size:,} bytes; move detail into a docs/ page and link it."


def test_relative_links_lead_to_files_and_headings_that_exist() -> None:
    """Every relative link in README.md and docs/*.md names a file that exists and, for a page, a real heading."""
    broken = [problem for page in PAGES for problem in broken_links(page)]
    assert broken == [], "\n".join(broken)


def test_the_link_check_catches_a_missing_file_and_a_missing_anchor(tmp_path: Path) -> None:
    """The checker itself reports a link to a missing page and to a heading that is not there, and no code."""
    (tmp_path / "other.md").write_text("# Other page\n\n## Exit codes\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md#exit-codes) [gone](missing.md) [typo](other.md#exit-code) [self](#title)\n"
        "# Title\n\n`[not a link](nowhere.md)`\n\n```md\n[also not](nowhere.md)\n```\n",
        encoding="utf-8",
    )
    assert broken_links(page) == [
        "page.md: missing.md (no such file)",
        "page.md: other.md#exit-code (no heading with that anchor in other.md)",
    ]


def test_the_readme_library_snippet_runs_as_written(
    sim: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """README's Python snippet labels reviews.csv into labels.parquet and prints labeled, failed and exit code."""
    code = _python_block(README)
    assert "http://127.0.0.1:8787/v1" in code
    write_csv(tmp_path / "reviews.csv", reviews(30))
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace("http://127.0.0.1:8787/v1", sim.base_url), "README.md", "exec"), {})  # noqa: S102
    assert capsys.readouterr().out.split() == ["30", "0", "0"]
    assert (tmp_path / "labels.parquet").is_dir()


def _python_block(page: Path) -> str:
    """The first ```python block of a page."""
    block = re.search(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), re.DOTALL)
    assert block is not None, f"{page.name} has no Python snippet"
    return block.group(1)


def test_the_output_format_reading_snippet_reads_both_sinks(
    sim: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/output-format.md's pandas, polars and duckdb lines read a Parquet and a JSONL sink as written."""
    for module in ("duckdb", "pandas", "polars"):
        pytest.importorskip(module)
    source = write_csv(tmp_path / "in.csv", reviews(20))
    for name in ("labels.parquet", "labels.jsonl"):
        assert label(sim, source, tmp_path / name).labeled == 20
    monkeypatch.chdir(tmp_path)
    found: dict[str, Any] = {}
    exec(compile(_python_block(ROOT / "docs" / "output-format.md"), "output-format.md", "exec"), found)  # noqa: S102
    assert len(found["labels"]) == len(found["rows"]) == found["lazy"].collect().height == 20
    assert sum(n for _, n in found["counts"]) == sum(n for _, n in found["jsonl_counts"]) == 20
    assert sorted(found["rows"]["id"]) == sorted(found["labels"]["id"])


def test_docs_never_point_outside_the_repository() -> None:
    """README.md and docs/*.md name no ../shared path (design notes that a clone does not have)."""
    offending = [page.name for page in PAGES if re.search(r"\.\./shared|/work/shared", page.read_text("utf-8"))]
    assert offending == []
