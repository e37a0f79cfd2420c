"""The documentation agrees with the CLI, and the README stays a front door.

* Every option a command shows in ``--help`` (both names of a ``--x/--no-x`` pair,
  and its environment variable) is written, as the literal option string, in the
  docs page of that command's group (:data:`DOCS`).
* The README is under 150 lines and opens with exactly the two commands for a
  fresh machine.
* Every relative link (and ``#anchor``) in README.md and docs/*.md resolves, and
  every docs page is reachable from the index.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS_DIR = REPO / "docs"
MAX_README_LINES = 150

# command path -> the page that documents its options. A subcommand not listed falls back to
# its group's page (("study", "x") -> ("study",)); a new top-level command must be added here.
DOCS: dict[tuple[str, ...], str] = {
    (): "docs/README.md",  # `topocam --version`
    ("run",): "docs/run.md",
    ("data",): "docs/data.md",
    ("data", "import"): "docs/data.md",
    ("study",): "docs/study.md",
    ("study", "run"): "docs/study.md",
    ("study", "compare"): "docs/study.md",
    ("study", "status"): "docs/study.md",
    ("ablate",): "docs/ablate.md",
    ("explain",): "docs/ablate.md",
    ("report",): "docs/report.md",
    ("export",): "docs/deploy.md",
    ("serve",): "docs/deploy.md",
    ("predict",): "docs/deploy.md",
    ("app",): "docs/deploy.md",
}
SKIP_OPTIONS = {"--help", "--install-completion", "--show-completion"}


# ---------------------------------------------------------------------------------------------
# the checker

def walk(command, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], object]]:
    """Every command under ``command`` (itself first) with its path of names. Duck-typed: Typer
    builds on its own copy of click (``typer._click``), so ``isinstance(x, click.Group)`` fails."""
    yield path, command
    for name, sub in sorted((getattr(command, "commands", None) or {}).items()):
        if not getattr(sub, "hidden", False):
            yield from walk(sub, path + (name,))


def option_strings(command) -> list[str]:
    """The long option names and environment variables ``--help`` shows for ``command``."""
    out: list[str] = []
    for p in command.params:
        if getattr(p, "param_type_name", "") != "option" or getattr(p, "hidden", False):
            continue
        names = [n for n in (*p.opts, *getattr(p, "secondary_opts", ())) if n.startswith("--")]
        out += [n for n in names if n not in SKIP_OPTIONS]
        if names and not set(names) <= SKIP_OPTIONS:
            env = getattr(p, "envvar", None)
            out += [env] if isinstance(env, str) else list(env or ())
    return list(dict.fromkeys(out))


def mentioned(name: str, text: str) -> bool:
    """``name`` written as itself: ``--seed`` is not found in ``--seeds``, nor ``--tau`` in ``--tau-mode``."""
    return re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text) is not None


def undocumented(command, text: str) -> list[str]:
    """The options of ``command`` (not of its subcommands) that ``text`` never mentions."""
    return [n for n in option_strings(command) if not mentioned(n, text)]


def docs_page(path: tuple[str, ...]) -> str | None:
    for n in range(len(path), -1, -1):
        if path[:n] in DOCS and (n > 0 or not path):  # the root's page is for the root only
            return DOCS[path[:n]]
    return None


def cli_root():
    from topocam.cli import app

    return typer.main.get_command(app)


# ---------------------------------------------------------------------------------------------
# the CLI and the docs agree

def test_every_option_in_help_is_documented_in_its_groups_page():
    missing: dict[str, list[str]] = {}
    unmapped = []
    for path, command in walk(cli_root()):
        page = docs_page(path)
        if page is None:
            unmapped.append(" ".join(path))
            continue
        text = (REPO / page).read_text()
        gaps = undocumented(command, text)
        if path and not mentioned("topocam " + " ".join(path), text.replace("`", "")):
            gaps.insert(0, f"(the command 'topocam {' '.join(path)}' itself)")
        if gaps:
            missing[f"topocam {' '.join(path)}".strip() + f" -> {page}"] = gaps
    assert not unmapped, f"commands with no docs page in tests/test_docs.py DOCS: {unmapped}"
    assert not missing, "options in --help that their docs page never mentions: " + "; ".join(
        f"{k}: {', '.join(v)}" for k, v in missing.items())


def test_the_walk_sees_every_command_and_flag_pair():
    """A guard on the checker itself: the walk reaches nested commands and both names of a pair."""
    by_path = dict(walk(cli_root()))
    assert {("run",), ("study", "run"), ("study", "compare"), ("study", "status"), ("ablate",), ("explain",),
            ("export",), ("serve",), ("predict",), ("app",)} <= set(by_path)
    assert {"--tau", "--no-tracking", "MLFLOW_TRACKING_URI"} <= set(option_strings(by_path[("run",)]))
    assert {"--figures", "--no-figures"} <= set(option_strings(by_path[("ablate",)]))
    assert not SKIP_OPTIONS & set(option_strings(by_path[()]))


def test_an_undocumented_option_is_reported():
    synthetic = typer.Typer()

    @synthetic.command()
    def made_up(
        not_documented_anywhere: int = typer.Option(0, "--not-documented-anywhere"),
        shown: bool = typer.Option(True, "--shown/--not-shown"),
        secret: int = typer.Option(0, "--secret", hidden=True),
        storage: str = typer.Option("", "--store-url", envvar="MADE_UP_STORE"),
    ):
        """A command for the checker only."""

    command = typer.main.get_command(synthetic)
    text = "`--shown/--not-shown`, `--store-url` (or `$MADE_UP_STORE`); --not-documented-anywhere-else is another"
    assert undocumented(command, text) == ["--not-documented-anywhere"]
    assert undocumented(command, "") == ["--not-documented-anywhere", "--shown", "--not-shown", "--store-url",
                                         "MADE_UP_STORE"]


def test_an_undocumented_option_of_a_plain_click_command_is_reported():
    click = pytest.importorskip("click")
    command = click.Command("plain", params=[click.Option(["-n", "--not-documented-anywhere"]),
                                             click.Option(["--quiet/--loud"])])
    assert undocumented(command, "--quiet or --loud") == ["--not-documented-anywhere"]


# ---------------------------------------------------------------------------------------------
# the README

def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n < MAX_README_LINES, f"README.md has {n} lines; move detail into docs/"


def first_fenced_block(text: str) -> tuple[list[str], list[str]]:
    """(the lines before the first fence, the lines inside it)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("```"))
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("```"))
    return lines[:start], lines[start + 1:end]


def test_readme_opens_with_the_two_commands_for_a_fresh_machine():
    before, block = first_fenced_block(README.read_text())
    assert [line for line in before if line.strip() and not line.startswith("# ")] == [], \
        "only the title may come before the two commands"
    commands = [line for line in block if line.strip() and not line.lstrip().startswith("#")]
    assert len(commands) == 2, commands
    assert "topocam study compare studies/quickstart.toml" in commands[0]
    assert "pytest" in commands[1]


# ---------------------------------------------------------------------------------------------
# links

def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS_DIR.glob("*.md"))]


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code (links inside them are not links)."""
    text = re.sub(r"^```.*?^```[^\n]*$", "", text, flags=re.S | re.M)
    text = re.sub(r"^(?: {4}|\t).*$", "", text, flags=re.M)  # indented code blocks
    return re.sub(r"`[^`\n]*`", "", text)


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown file."""
    out: set[str] = set()
    text = re.sub(r"^```.*?^```[^\n]*$", "", path.read_text(), flags=re.S | re.M)
    for m in re.finditer(r"^#{1,6}\s+(.*?)\s*#*\s*$", text, flags=re.M):
        heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1))
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        base, k = slug, 1
        while slug in out:
            slug, k = f"{base}-{k}", k + 1
        out.add(slug)
    return out


def is_external(target: str) -> bool:
    return re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) is not None  # http:, https:, mailto:


def broken_links(path: Path) -> list[str]:
    """Each relative link of ``path`` whose file, or whose ``#anchor`` in a Markdown file, is missing."""
    bad = []
    for target in LINK.findall(prose(path.read_text())):
        if is_external(target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = path.parent / file_part if file_part else path
        if not dest.exists():
            bad.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target} (no heading #{anchor})")
    return bad


def test_every_relative_link_resolves():
    bad = {str(p.relative_to(REPO)): broken_links(p) for p in markdown_files()}
    assert {k: v for k, v in bad.items() if v} == {}


def test_a_broken_link_is_reported(tmp_path):
    (tmp_path / "there.md").write_text("# A heading\n\n## `topocam explain`: figures, again\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](there.md#a-heading) [ok too](there.md#topocam-explain-figures-again) [gone](missing.md)\n"
                    "[no anchor](there.md#nope) `[code](missing.md)` [web](https://example.org/x) [self](#nowhere)\n")
    assert broken_links(page) == ["missing.md (no such file)", "there.md#nope (no heading #nope)",
                                  "#nowhere (no heading #nowhere)"]


def test_every_docs_page_is_reachable_from_the_index():
    index = DOCS_DIR / "README.md"
    linked = {(index.parent / t.partition("#")[0]).resolve() for t in LINK.findall(prose(index.read_text()))
              if not is_external(t) and t.partition("#")[0]}
    pages = {p.resolve() for p in DOCS_DIR.glob("*.md")} - {index.resolve()}
    assert sorted(p.name for p in pages - linked) == []
    readme_links = {t.partition("#")[0] for t in LINK.findall(prose(README.read_text()))}
    assert "docs/README.md" in readme_links
