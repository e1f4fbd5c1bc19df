"""The documentation describes the product: every relative link resolves, and no
tracked text file speaks of the project's own history (work sessions, issue
numbers, words for merging work, commit hashes used as dates)."""

import pathlib
import re
import subprocess

REPO = pathlib.Path(__file__).resolve().parents[1]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HISTORY = re.compile(
    r"\bsessions? \d+|\bissues? #?\d+|\bthe issue[']s\b|\bland(?:ing|ed)\b"
    r"|\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)[0-9a-f]{7}\b",
    flags=re.I,
)
SKIP = ("saved_models/", "tests/data/")


def markdown_files():
    pages = [REPO / "README.md", REPO / "CHANGELOG.md", REPO / "CONTRIBUTING.md"]
    return pages + sorted((REPO / "docs").rglob("*.md"))


def tracked_text_files():
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    for name in out.stdout.splitlines():
        path = REPO / name
        if name.startswith(SKIP) or not path.is_file():
            continue
        try:
            yield name, path.read_text()
        except UnicodeDecodeError:
            continue


def test_every_relative_link_resolves():
    broken = []
    for page in markdown_files():
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = target.split("#")[0]
            if not (page.parent / path).exists():
                broken.append(f"{page.relative_to(REPO)}: {target}")
    assert not broken, broken


def test_no_project_history_in_tracked_files():
    found = [
        f"{name}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
        for name, text in tracked_text_files()
        for m in HISTORY.finditer(text)
    ]
    assert not found, found


def test_the_history_pattern_catches_what_it_should():
    # Assembled from parts, so that this file does not itself read as history.
    work, ticket, merge, commit = "session", "issue", "land" + "ing", "b8357" + "af"
    for text in (f"in {work} 11", f"{ticket} 9's goal", f"at the first {merge}", commit):
        assert HISTORY.search(text), text
    for text in ("n_train=1281167", "defaced", "the 2-core machine"):
        assert not HISTORY.search(text), text
