"""The README's code that says it runs, runs as written (in a temporary folder, offline data)."""

import re

from .conftest import ROOT

MARK = "<!-- this block runs in tests/test_readme.py, as written -->"


def runnable_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(re.escape(MARK) + r"\n```python\n(.*?)```", text, flags=re.S)


def test_the_readme_s_own_model_runs_as_written(tmp_path, monkeypatch, capsys):
    (block,) = runnable_blocks()
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "log p(x)" in out and "epoch   5/5" in out
