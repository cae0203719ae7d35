"""README.md stays true: its two set-up commands are the ones CI runs, and its Python blocks execute."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_opens_with_the_two_setup_commands():
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    quickstart, tests = blocks[0].strip(), blocks[1].strip()
    assert README.index("```bash") < README.index("```python")
    assert quickstart.startswith("pip install torch==2.13.0") and quickstart.endswith("splice quickstart")
    assert tests.startswith("pip install torch==2.13.0") and tests.endswith("python -m pytest")
    assert tests in (ROOT / ".ci" / "run").read_text()  # CI runs exactly the README's test command


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the snippets write adapter folders
    for i, block in enumerate(re.findall(r"```python\n(.*?)```", README, re.S)):
        exec(compile(block, f"README.md python block {i}", "exec"), {"__name__": "__readme__"})


def test_readme_cli_commands_exist():
    from splice.cli import app

    names = {c.name or c.callback.__name__ for c in app.registered_commands}
    names |= {g.name for g in app.registered_groups}  # sub-apps such as `splice bench`
    for command in re.findall(r"`splice (\w+)", README):
        assert command in names, command
