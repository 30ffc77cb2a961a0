"""Every code block of README.md, CONTRIBUTING.md and docs/**/*.md runs as written, or says why not.

A fenced ``python`` block runs as written: the blocks of one page in order, in one namespace
(a page's later blocks build on its earlier ones), in a temporary folder, with the data root
``$PYVAE_DATA`` of the environment. A block right after ``<!-- not run: REASON -->`` is not run:
it is listed as a skipped test with its reason. Bash blocks are not run (they train for minutes,
download data or start torchrun); every ``python -m pyvae COMMAND FLAGS`` (or
``examples/mnist_svi.py FLAGS``) in them must name a command the CLI has and parse with that
command's parser, and every ``examples/*.py`` or ``configs/*.yaml`` they name must exist.
"""

import contextlib
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pyro
import pytest

from pyvae.cli.app import COMMANDS
from pyvae.cli.flags import parser
from tests.conftest import ROOT

PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(
    r"(?:<!-- not run: (?P<reason>[^\n]+?) -->\n+)?^```(?P<lang>\w*)\n(?P<code>.*?)^```$",
    re.S | re.M,
)


def blocks(page: Path) -> list[tuple[str, int, str, str | None]]:
    """(language, first line, code, why it is not run or None) of each fenced block of ``page``."""
    text = page.read_text()
    return [
        (m["lang"], text.count("\n", 0, m.start("code")) + 1, m["code"], m["reason"])
        for m in FENCE.finditer(text)
    ]


def name(page: Path) -> str:
    return str(page.relative_to(ROOT))


PYTHON_PAGES = [p for p in PAGES if any(b[0] == "python" and not b[3] for b in blocks(p))]
NOT_RUN_BLOCKS = [
    pytest.param(reason, id=f"{name(p)}:{line}")
    for p in PAGES
    for lang, line, _, reason in blocks(p)
    if lang == "python" and reason
]


@pytest.mark.parametrize("page", PYTHON_PAGES, ids=name)
def test_the_python_blocks_of_a_page_run_as_written(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pyro.clear_param_store()
    namespace = {"__name__": "docs"}
    for lang, line, code, reason in blocks(page):
        if lang == "python" and not reason:
            exec(compile("\n" * (line - 1) + code, str(page), "exec"), namespace)


def test_the_names_the_blocks_use_are_there_after_import_pyvae_alone():
    """What a reader copies into a fresh interpreter: ``import pyvae`` is all it imports, so every
    ``pyvae.NAME.NAME`` the blocks use must be reachable from it (pytest has imported more)."""
    code = "".join(b[2] for p in PYTHON_PAGES for b in blocks(p) if b[0] == "python" and not b[3])
    names = sorted(set(re.findall(r"\bpyvae(?:\.\w+)+", code)))
    check = "import pyvae\n" + "".join(f"{n}\n" for n in names)
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "reason",
    NOT_RUN_BLOCKS
    or [pytest.param("", marks=pytest.mark.skip(reason="no block is marked not run"))],
)
def test_blocks_marked_not_run_are_listed(reason):
    pytest.skip(f"not run: {reason}")


def test_a_block_after_a_not_run_mark_is_not_run(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "Text.\n\n<!-- not run: needs a GPU -->\n```python\nraise SystemExit\n```\n\n"
        "```python\nx = 1\n```\n"
    )
    assert blocks(page) == [
        ("python", 5, "raise SystemExit\n", "needs a GPU"),
        ("python", 9, "x = 1\n", None),
    ]


def test_every_block_names_its_language():
    assert PYTHON_PAGES, "no python block found"
    for page in PAGES:
        for lang, line, _, reason in blocks(page):
            assert lang, f"{name(page)}:{line}: a fenced block names no language"
            assert reason is None or lang == "python", f"{name(page)}:{line}: only python is run"


@pytest.mark.parametrize("page", PAGES, ids=name)
def test_shell_blocks_name_commands_and_files_that_exist(page):
    for lang, line, code, _ in blocks(page):
        if lang != "bash":
            continue
        for command in re.findall(r"-m pyvae\s+(\S+)", code):
            assert command in COMMANDS or command.startswith("-"), (
                f"{name(page)}:{line}: `python -m pyvae {command}` is none of {', '.join(COMMANDS)}"
            )
        for path in re.findall(r"\b(?:examples|configs|benchmarks)/[\w./-]+\.(?:py|yaml)\b", code):
            assert (ROOT / path).is_file(), f"{name(page)}:{line}: {path} does not exist"


#: words that end a command on a shell line
SHELL_ENDS = ("|", "&&", "||", ";", ">", "2>&1")


def shell_commands(code: str):
    """(command, its words) of every pyvae command line in a bash block: continuations joined,
    comments and what follows a pipe or ``&&`` left out."""
    for line in code.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        for i, word in enumerate(words):
            if word == "pyvae" and words[i - 1 : i] == ["-m"] and i + 1 < len(words):
                command, rest = words[i + 1], words[i + 2 :]
            elif word.endswith("examples/mnist_svi.py"):
                command, rest = "train", words[i + 1 :]
            else:
                continue
            end = next((j for j, w in enumerate(rest) if w in SHELL_ENDS), len(rest))
            yield command, rest[:end]
            break


@pytest.mark.parametrize("page", PAGES, ids=name)
def test_shell_blocks_give_flags_their_command_parses(page):
    for lang, line, code, _ in blocks(page):
        for command, words in shell_commands(code) if lang == "bash" else ():
            if command not in COMMANDS:
                continue  # named by the test above
            said = io.StringIO()
            try:
                with contextlib.redirect_stderr(said), contextlib.redirect_stdout(io.StringIO()):
                    parser(command).parse_args(words)
            except SystemExit as e:
                why = (said.getvalue().strip().splitlines() or [""])[-1]
                assert not e.code, f"{name(page)}:{line}: {command} {shlex.join(words)}: {why}"


def test_a_shell_line_gives_its_command_and_flags_alone():
    code = "PYVAE_DATA=d python -m pyvae evaluate runs/a \\\n  --method ais  # AIS\nls | wc\n"
    assert list(shell_commands(code)) == [("evaluate", ["runs/a", "--method", "ais"])]
    code = "python examples/mnist_svi.py --epochs 2 2>&1 | tail -3\n"
    assert list(shell_commands(code)) == [("train", ["--epochs", "2"])]
