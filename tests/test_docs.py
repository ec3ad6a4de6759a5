"""The docs stand alone, and their commands paste into a shell as written.

* every relative link in README.md, benchmarks/README.md and docs/*.md names a file inside the
  repository (and, with ``#anchor``, a heading of it), and nothing points at notes outside it;
* every ``bash`` block parses (``bash -n``) and holds no placeholder the shell would misread:
  ``<id>`` is a redirect, ``[--json]`` a literal argument, ``...`` a literal ``...``;
* the README's W&B resume reads the run ids from the files the example's programs write, and
  the id lines it shows are the ones they print.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from examples.reverse_text.common import wandb_id_path

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Files whose comments and docstrings may name another document.
SOURCES = [*DOCS, ROOT / "Makefile", ROOT / "pyproject.toml",
           *sorted(p for d in ("prime_ckpt", "examples", "benchmarks", "tests") for p in (ROOT / d).rglob("*.py"))]
OUTSIDE = re.compile(r"\.\./shared/|(?<![\w/.-])shared/(?:DESIGN|STYLE|notes|seed)\b")

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
PLACEHOLDERS = {
    "a <placeholder> (a redirect in bash)": re.compile(r"<[A-Za-z][\w.-]*(?: [\w.-]+)*>"),
    "an optional [--flag] (a literal argument)": re.compile(r"\[--"),
    "a bare ... (a literal argument)": re.compile(r"(?<!\S)\.\.\.(?!\S)"),
}
ID_LINE = re.compile(r"^(trainer|orchestrator): W&B run id (\w+) \(project (\S+), (offline|online); written to (\S+)\)$")


def blocks(text: str, lang: str) -> list[str]:
    return [body for kind, body in FENCE.findall(text) if kind == lang]


def prose(text: str) -> str:
    """``text`` without fenced blocks and inline code (links there are not links)."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {slug(m) for m in re.findall(r"^#{1,6} (.+)$", text, re.MULTILINE)}


def unquoted(script: str) -> str:
    """What bash reads outside quotes and comments (each quoted string becomes one space)."""
    out, i, n = [], 0, len(script)
    while i < n:
        c = script[i]
        if c == "\\":
            out.append(script[i : i + 2])
            i += 2
        elif c in "'\"":
            close = i + 1
            while close < n and script[close] != c:
                close += 2 if c == '"' and script[close] == "\\" else 1
            out.append(" ")
            i = close + 1
        elif c == "#" and (i == 0 or script[i - 1].isspace()):
            while i < n and script[i] != "\n":
                i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def shell_problems(script: str) -> list[str]:
    """Placeholders in ``script`` that bash would not take as the reader means them."""
    problems = []
    for lineno, line in enumerate(unquoted(script).splitlines(), 1):
        for what, pattern in PLACEHOLDERS.items():
            problems += [f"line {lineno}: {what}: {m.group(0)!r}" for m in pattern.finditer(line)]
    return problems


# -- links ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves_inside_the_repository(doc):
    bad = []
    for target in LINK.findall(prose(doc.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        path_part, _, anchor = target.partition("#")
        dest = (doc.parent / path_part).resolve() if path_part else doc
        if not dest.is_relative_to(ROOT) or not dest.exists():
            bad.append(f"{target}: not a file in the repository")
        elif anchor and dest.is_file() and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not bad, f"{doc.relative_to(ROOT)}: " + "; ".join(bad)


def test_no_document_or_comment_points_outside_the_repository():
    found = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
             for p in SOURCES for n, line in enumerate(p.read_text().splitlines(), 1) if OUTSIDE.search(line)]
    assert not found, "\n".join(found)
    assert (ROOT / "docs" / "DESIGN.md").is_file()
    assert "[docs/DESIGN.md](docs/DESIGN.md)" in (ROOT / "README.md").read_text()


# -- bash blocks ---------------------------------------------------------------------------------
def test_the_placeholder_check_catches_what_bash_misreads():
    """The checker itself: the README's old resume line is caught, quoted text and comments are not."""
    assert shell_problems("rl --ckpt.resume-step 10 --trainer.monitor.wandb.id <trainer-run-id>\n")
    assert shell_problems("prime-ckpt list outputs/rt [--json]\n")
    assert shell_problems("python -m torch.distributed.run your_trainer.py ...\n")
    assert not shell_problems('rl --id "$(cat outputs/rt/wandb/trainer.id)"  # or: --id <trainer-run-id>\n')
    assert not shell_problems("x --storage.options '{\"k\": \"<v>\"}' --filter 'app.model.*'\n")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_bash_blocks_paste_into_a_shell_as_written(doc):
    for n, script in enumerate(blocks(doc.read_text(), "bash"), 1):
        r = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, f"{doc.relative_to(ROOT)} bash block {n}: {r.stderr}\n{script}"
        problems = shell_problems(script)
        assert not problems, f"{doc.relative_to(ROOT)} bash block {n}: " + "; ".join(problems) + f"\n{script}"


# -- the W&B resume ------------------------------------------------------------------------------
def test_readme_resume_reads_the_ids_where_the_programs_write_them():
    readme = (ROOT / "README.md").read_text()
    [example] = [b for b in blocks(readme, "bash") if "--orchestrator.monitor.wandb.id" in b]
    out = Path(re.search(r"--output-dir (\S+)", example).group(1))
    read_back = re.findall(r'--(trainer|orchestrator)\.monitor\.wandb\.id "\$\(cat (\S+)\)"', example)
    assert sorted(read_back) == [(p, wandb_id_path(out, p).as_posix()) for p in ("orchestrator", "trainer")]
    shown = [ID_LINE.match(line) for b in blocks(readme, "text") for line in b.splitlines() if "W&B run id" in line]
    assert [m.group(1) for m in shown if m] == ["trainer", "orchestrator"], shown
    assert all(m.group(5) == wandb_id_path(out, m.group(1)).as_posix() for m in shown)
