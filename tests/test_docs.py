"""The docs hold together: README.md stays short; every relative link in README.md and docs/*.md
reaches a file, and a heading where it names one; every pointer to the documentation in the code
(``docs/<page>.md: "<section>"``, ``docs/<page>.md#<anchor>``, the same for ``README.md``) names a
page and a section that exist; and the exit-code table of docs/troubleshooting.md lists every exit
code of ddp_train/errors.py.

Each checker is a function of its input, shown to find a broken link, pointer or table on a
small example (a check that cannot fail proves nothing), then run on the real files.
"""

from __future__ import annotations

import re
from pathlib import Path

from .helpers import ROOT

MAX_README_LINES = 250
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Where pointers to the docs live: messages, help texts, comments, docstrings, configs, tests.
CODE_GLOBS = ["ddp_train/**/*.py", "launch/*", "bench/*.py", "bench/*.sh", ".ci/*", "configs/*.yaml", "tests/*.py"]

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$")
INLINE_CODE = re.compile(r"`[^`\n]*`")
# [text](target) and ![alt](target), with an optional "title".
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")
# docs/<page>.md or README.md, then a quoted section (a backslash before a quote: inside a Python
# string), an #anchor, or neither. Not preceded by a path character: ../README.md is a link.
POINTER = re.compile(r"(?<![\w/.-])(docs/[\w-]+\.md|README\.md)(?:#([\w-]+)|: \\?\"([^\"\\\n]+)\\?\")?")
UNQUOTED = re.compile(r"(?<![\w/.-])(?:docs/[\w-]+\.md|README\.md): (?!\\?\")")
# The README's name without .md (or an identifier such as README_START): a pointer to a README
# section that the split into docs/ may have moved.
BARE_README = re.compile(r"\bREADME\b(?!\.md|_)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text (links and code spans unwrapped) lowercased, every
    character but letters, digits, spaces, '-' and '_' dropped, each space made a '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).lower()
    return "".join(c for c in text if c.isalnum() or c in "-_ ").replace(" ", "-")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) for the lines of a markdown text outside fenced code blocks."""
    lines, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append((number, line))
    return lines


def anchors(text: str) -> set[str]:
    """The anchors of a markdown text's headings; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    for _, line in prose_lines(text):
        match = HEADING.match(line)
        if match:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            if count:
                seen.setdefault(f"{base}-{count}", 1)
    return set(seen)


def broken_links(page: Path) -> list[str]:
    """``page:line target (why)`` for each relative link of a markdown page that does not resolve."""
    found = []
    for number, line in prose_lines(page.read_text()):
        for target in LINK.findall(INLINE_CODE.sub("", line)):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:: not this repository's
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                found.append(f"{page.name}:{number} {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
                found.append(f"{page.name}:{number} {target} (no heading #{anchor} in {dest.name})")
    return found


def bad_pointers(path: Path, root: Path = ROOT) -> list[str]:
    """``path:line pointer (why)`` for each pointer to the docs in ``path`` whose page or section
    does not exist under ``root``, whose section is not quoted, or that names the README bare."""
    found = []
    is_markdown = path.suffix == ".md"
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        where = f"{path.name}:{number}"
        for target, anchor, section in POINTER.findall(line):
            page = root / target
            if not page.is_file():
                found.append(f"{where} {target} (no such page)")
            elif (anchor or section) and (anchor or slug(section)) not in anchors(page.read_text()):
                found.append(f"{where} {target} {anchor or repr(section)} (no such section)")
        if UNQUOTED.search(line):
            found.append(f'{where} an unquoted section: write docs/<page>.md: "<section>"')
        if not is_markdown and BARE_README.search(line):
            found.append(f'{where} the README without a page and section: write README.md: "<section>"')
    return found


def exit_code_table(troubleshooting: str) -> set[int]:
    """The codes in the first column of the table under the page's "Exit codes" heading."""
    section = troubleshooting.split("\n## Exit codes\n", 1)[1].split("\n## ", 1)[0]
    return {int(m) for m in re.findall(r"^\|\s*(\d+)\b", section, re.MULTILINE)}


def exit_codes(errors_source: str) -> dict[str, int]:
    """The ``EXIT_*`` constants of ddp_train/errors.py and their values."""
    return {name: int(value) for name, value in re.findall(r"^(EXIT_\w+)\s*=\s*(\d+)", errors_source, re.MULTILINE)}


def code_files() -> list[Path]:
    files = {p for pattern in CODE_GLOBS for p in ROOT.glob(pattern) if p.is_file() and p.suffix != ".pyc"}
    return sorted(files - {Path(__file__).resolve()})


# The checkers find what they are for.

def test_slugs_are_githubs():
    assert slug("Ranks that do not agree (preflight)") == "ranks-that-do-not-agree-preflight"
    assert slug("Fine-tune: `model.init_from`") == "fine-tune-modelinit_from"
    assert slug("Changing a run's config") == "changing-a-runs-config"
    assert slug("Exactness (CPU, gloo; tested in fp32)") == "exactness-cpu-gloo-tested-in-fp32"
    assert anchors("# A\n```\n# not a heading\n```\n## A\n#SBATCH x\n") == {"a", "a-1"}


def test_a_broken_link_or_anchor_is_found(tmp_path):
    (tmp_path / "other.md").write_text("# Other\n\n## A section\n")
    page = tmp_path / "page.md"
    page.write_text("# Page\n\n## Here\n\n[ok](other.md#a-section) [ok](#here) [web](https://x.org/y#z)\n"
                    "`[in code](missing.md)`\n```\n[in a block](missing.md)\n```\n"
                    "[gone](missing.md) [bad anchor](other.md#nope) [bad here](#nowhere)\n")
    assert broken_links(page) == ["page.md:10 missing.md (no such file)",
                                  "page.md:10 other.md#nope (no heading #nope in other.md)",
                                  "page.md:10 #nowhere (no heading #nowhere in page.md)"]


def test_a_bad_pointer_is_found(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# Page\n\n## Changing a run's config\n")
    (tmp_path / "README.md").write_text("# Project\n\n## Quick start\n")
    code = tmp_path / "code.py"
    code.write_text('ok = "see docs/page.md: \\"Changing a run\'s config\\""  # docs/page.md#changing-a-runs-config\n'
                    '# README.md: "Quick start", docs/page.md\n'
                    'gone = "see docs/nope.md"\n'
                    '# docs/page.md: "Configuration" and docs/page.md#keys\n'
                    '# docs/page.md: Changing a run\'s config\n'
                    "# see the README's Configuration\n")
    assert bad_pointers(code, tmp_path) == [
        "code.py:3 docs/nope.md (no such page)",
        "code.py:4 docs/page.md 'Configuration' (no such section)",
        "code.py:4 docs/page.md keys (no such section)",
        'code.py:5 an unquoted section: write docs/<page>.md: "<section>"',
        'code.py:6 the README without a page and section: write README.md: "<section>"',
    ]


def test_a_missing_exit_code_is_found():
    table = ("# T\n\n## Exit codes\n\n| code | meaning |\n| --- | --- |\n| 0 | done |\n| 1 (else) | crash |\n"
             "\n## Next\n| 3 | x |\n")
    assert exit_code_table(table) == {0, 1}
    assert exit_codes("EXIT_OK = 0\nEXIT_HANG = 3  # hang\n") == {"EXIT_OK": 0, "EXIT_HANG": 3}


# The real files.

def test_the_readme_is_short():
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines: move the detail to docs/"


def test_every_relative_link_resolves():
    assert len(PAGES) > 5
    assert [bad for page in PAGES for bad in broken_links(page)] == []


def test_every_pointer_to_the_docs_names_a_page_and_section_that_exist():
    files = code_files()
    assert ROOT / "ddp_train" / "persistence" / "resume.py" in files and ROOT / "launch" / "slurm.sbatch" in files
    pointers = sum(len(POINTER.findall(p.read_text(errors="replace"))) for p in files)
    assert pointers > 10  # the scan sees the code's pointers
    assert [bad for path in files + PAGES for bad in bad_pointers(path)] == []


def test_every_exit_code_is_in_the_troubleshooting_table():
    codes = exit_codes((ROOT / "ddp_train" / "errors.py").read_text())
    assert set(codes.values()) >= {0, 2, 3, 75}
    table = exit_code_table((ROOT / "docs" / "troubleshooting.md").read_text())
    assert {name: code for name, code in codes.items() if code not in table} == {}
