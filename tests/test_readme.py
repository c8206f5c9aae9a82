"""The README is a front door: short, a module map that matches the package, links that resolve.

Reads files only: no network, no model, no import of grpo_cli.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
PACKAGE = REPO / "grpo_cli"
DOCS = REPO / "docs"
MAX_LINES = 250

# A markdown link or image target: ](target) or ](target "title"); the fragment is cut off later.
LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
# A map entry: a bullet whose first code span names a package (trailing slash) or a module of grpo_cli/.
MAP_ENTRY = re.compile(r"^\s*[-*]\s+`(grpo_cli/[^`]*)`", re.MULTILINE)


def _readme() -> str:
    return README.read_text(encoding="utf-8")


def _section(text: str, heading: str) -> str:
    """The body of the level-2 section ``heading``, up to the next level-2 heading."""
    match = re.search(rf"^## {re.escape(heading)}[ \t]*$", text, re.MULTILINE)
    assert match, f"README.md has no '## {heading}' section"
    rest = text[match.end() :]
    following = re.search(r"^## ", rest, re.MULTILINE)
    return rest[: following.start()] if following else rest


def _links(text: str) -> list[str]:
    """Relative link targets (no scheme, no bare #anchor), their fragments cut off."""
    targets = []
    for target in LINK.findall(text):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("#"):
            continue  # https://..., mailto:..., or an anchor in the same page
        targets.append(target.split("#", 1)[0])
    return targets


def _packages() -> set[str]:
    """``grpo_cli/<path>/`` for every directory with an ``__init__.py`` below grpo_cli/ (any depth)."""
    return {
        f"grpo_cli/{init.parent.relative_to(PACKAGE).as_posix()}/"
        for init in PACKAGE.rglob("__init__.py")
        if init.parent != PACKAGE and "__pycache__" not in init.parts
    }


def _top_level_modules() -> set[str]:
    return {
        f"grpo_cli/{p.name}" for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py")
    }


def _map_entries() -> set[str]:
    return set(MAP_ENTRY.findall(_section(_readme(), "Module map")))


def test_readme_is_at_most_250_lines():
    lines = _readme().splitlines()
    assert len(lines) <= MAX_LINES, f"README.md has {len(lines)} lines; move long sections to docs/"


def test_module_map_names_every_package_and_top_level_module():
    missing = (_packages() | _top_level_modules()) - _map_entries()
    assert not missing, f"not in README.md's '## Module map': {sorted(missing)}"


def test_every_module_map_entry_exists():
    entries = _map_entries()
    assert entries, "README.md's '## Module map' lists no `grpo_cli/...` entries"
    for entry in sorted(entries):
        path = REPO / entry
        if entry.endswith("/"):
            assert (path / "__init__.py").is_file(), f"{entry} is in the module map but is not a package"
        else:
            assert entry.endswith(".py") and path.is_file(), f"{entry} is in the module map but not on disk"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {Path(t).as_posix() for t in _links(_readme())}
    pages = {p.relative_to(REPO).as_posix() for p in DOCS.glob("*.md")}
    unlinked = pages - linked
    assert not unlinked, f"docs pages the README does not link: {sorted(unlinked)}"


def test_every_readme_link_into_docs_exists():
    targets = [t for t in _links(_readme()) if t.startswith(("docs/", "./docs/"))]
    assert targets, "README.md links to nothing under docs/"
    missing = [t for t in targets if not (REPO / t).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"


def test_every_relative_link_in_the_docs_pages_exists():
    broken = [
        f"{page.name}: {target}"
        for page in sorted(DOCS.glob("*.md"))
        for target in _links(page.read_text(encoding="utf-8"))
        if target and not (page.parent / target).exists()
    ]
    assert not broken, f"broken relative links in docs/: {broken}"


# A repository path in a code span: under one of the project's top-level folders, no placeholders.
DOC_PATH = re.compile(r"`((?:grpo_cli|conf|scripts|tests|docs|\.ci)/[A-Za-z0-9_./-]*)(?:::[^`]*)?`")


def _doc_paths() -> dict[str, set[str]]:
    """Each repository path named in a code span of the README, docs/*.md and .ci/run -> the files naming it."""
    named: dict[str, set[str]] = {}
    for page in [README, *sorted(DOCS.glob("*.md")), REPO / ".ci" / "run"]:
        for path in DOC_PATH.findall(page.read_text(encoding="utf-8")):
            named.setdefault(path.rstrip("."), set()).add(page.name)
    return named


def test_every_path_the_docs_name_exists():
    named = _doc_paths()
    assert len(named) > 20  # the pattern finds the paths the pages name (it is not matching nothing)
    missing = {path: sorted(pages) for path, pages in named.items() if not (REPO / path).exists()}
    assert not missing, f"paths named in code spans that do not exist: {missing}"
