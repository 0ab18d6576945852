"""A newcomer's first hour, scripted: a fresh virtual environment, the package installed into it, the README's code
run as written, and the quickstart command in its ``--tiny`` form.

Which README code runs: every fenced ```` ```python ```` block that directly follows a line
``<!-- newcomer: run -->`` (blank lines between are allowed). The blocks run in README order as one script, in an
empty folder, so a later block may use what an earlier one defined or saved. A marker that is not followed by a
Python block is an error, so a README edit cannot silently drop a block from the test.

SmolLM2 stands in as a tiny Llama: the test saves one with a tokenizer and points ``$PEFT_COFI_CACHE`` at it, and
``peft_cofi.example_model`` uses a cache folder that already holds a model as it is. README code that gets its
model from ``load_smollm2()`` / ``ensure_smollm2_cache()`` (or ``peft-cofi example-model``) therefore runs in seconds
here and on SmolLM2 for a reader.

The venv is made with ``--system-site-packages`` so the installed torch and transformers are reused and nothing big
is downloaded; ``pip install --no-deps -e`` still builds the package (with hatchling, from pip's index or cache).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_models import tiny_llama
from tiny_tokenizer import tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARKER = "<!-- newcomer: run -->"
_BLOCK = re.compile(r"^" + re.escape(MARKER) + r"[ \t]*\n(?:[ \t]*\n)*```python[ \t]*\n(.*?)^```", re.M | re.S)


def runnable_blocks(text: str) -> list[str]:
    """The code of every ```` ```python ```` block marked with ``<!-- newcomer: run -->``, in order.

    Example:
        >>> runnable_blocks("<!-- newcomer: run -->\\n\\n```python\\nx = 1\\n```\\n```python\\nnot run\\n```\\n")
        ['x = 1\\n']
    """
    blocks = [match.group(1) for match in _BLOCK.finditer(text)]
    markers = len(re.findall(r"^" + re.escape(MARKER), text, re.M))
    if markers != len(blocks):
        raise ValueError(f"{markers} {MARKER} markers but {len(blocks)} ```python blocks directly after them")
    return blocks


def test_runnable_blocks_rule() -> None:
    text = (
        f"intro\n```python\nskipped()\n```\n{MARKER}\n```python\na = 1\n```\ntext\n\n{MARKER}\n\n"
        "```python\nb = a + 1\n\nprint(b)\n```\n```bash\nls\n```\n"
    )
    assert runnable_blocks(text) == ["a = 1\n", "b = a + 1\n\nprint(b)\n"]
    with pytest.raises(ValueError, match="1 <!-- newcomer: run --> markers but 0"):
        runnable_blocks(f"{MARKER}\n```bash\nls\n```\n")


def run(command: list[str], cwd: Path, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.mark.slow
def test_a_newcomer_runs_the_readme_in_a_fresh_venv(tmp_path: Path) -> None:
    blocks = runnable_blocks(README.read_text(encoding="utf-8"))
    assert blocks, f"README.md marks no Python block with {MARKER}; see this test's docstring"
    assert "python -m examples.quickstart" in README.read_text(encoding="utf-8")

    stand_in = tmp_path / "example-model"
    tiny_llama().save_pretrained(stand_in)
    tiny_tokenizer().save_pretrained(stand_in)
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PEFT_COFI_AUTOLOAD")}
    env |= {"HF_HUB_OFFLINE": "1", "PEFT_COFI_CACHE": str(stand_in)}

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], tmp_path, env)
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "-e", str(ROOT)], tmp_path, env)
    locate = "import importlib.metadata as m; print(m.distribution('peft-cofi').locate_file(''))"
    assert Path(run([str(python), "-c", locate], tmp_path, env).stdout.strip()).is_relative_to(venv)

    # the CLI from the venv's bin/ names the cache folder any code can load
    assert run([str(bin_dir / "peft-cofi"), "example-model"], tmp_path, env).stdout == f"{stand_in}\n"

    work = tmp_path / "work"
    work.mkdir()
    script = work / "readme_blocks.py"
    script.write_text("\n\n".join(blocks), encoding="utf-8")
    run([str(python), str(script)], work, env)

    out = tmp_path / "quickstart"
    result = run([str(python), "-m", "examples.quickstart", "--tiny", "--steps", "2", "--out", str(out)], ROOT, env)
    assert "reload check: PASSED" in result.stdout
