"""README.md's code, run as written: every ```python block, in order, in one namespace, and every
command of every ```bash block (``fastcap ...`` and ``python -m fastcap ...`` through the
command line's ``main``; ``make demo``/``make demo-lm`` as the ``fastcap`` commands their recipe
runs), in a temporary working directory.

A block that cannot run here (it needs your own model, data or GPUs, or it is the set-up itself)
is preceded by the line ``<!-- not run: REASON -->``; the reason is required. Blocks without a
language (printed output, file lists) are not code.
"""
from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
_FENCE = re.compile(r"^```(\w*)\s*$")
_NOT_RUN = re.compile(r"^<!-- not run: (.+?) -->$")


def readme_blocks() -> list[tuple[int, str, str, str | None]]:
    """(line, language, code, reason not to run) of every fenced block with a language."""
    blocks, lines = [], README.read_text().splitlines()
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        previous = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        reason = _NOT_RUN.match(previous.strip())
        if match.group(1):
            blocks.append((i + 1, match.group(1), "\n".join(lines[i + 1:end]), reason and reason.group(1)))
        i = end + 1
    return blocks


def shell_commands(code: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", code)
    commands = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            commands.append(words)
    return commands


def fastcap_args(words: list[str]) -> list[list[str]]:
    """The arguments of fastcap's command line that a README command runs."""
    if words[0] == "fastcap":
        return [words[1:]]
    if words[:3] == ["python", "-m", "fastcap"]:
        return [words[3:]]
    if words[0] == "make" and len(words) == 2:
        # What the recipe runs, with the Makefile's variables expanded (make -n runs nothing).
        recipe = subprocess.run(["make", "-s", "-n", "-C", str(ROOT), words[1]], capture_output=True,
                                text=True, check=True).stdout
        runs = [shlex.split(line) for line in re.sub(r"\\\n\s*", " ", recipe).splitlines() if "-m fastcap" in line]
        assert runs, f"make {words[1]} runs no fastcap command: {recipe}"
        return [run[run.index("fastcap") + 1:] for run in runs]
    raise AssertionError(f"README command {' '.join(words)!r} is neither fastcap nor make demo*: mark its "
                         "block with <!-- not run: REASON -->")


def test_every_block_is_run_or_says_why_not():
    blocks = readme_blocks()
    assert any(language == "python" for _, language, _, _ in blocks)
    for line, language, _, reason in blocks:
        assert language in ("python", "bash"), f"README.md:{line}: a ```{language} block: python or bash"
        assert reason is None or reason.strip(), f"README.md:{line}: <!-- not run: --> needs a reason"


def test_readme_code_runs(tmp_path, monkeypatch, capsys):
    from fastcap.cli import main

    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    ran = 0
    for line, language, code, reason in readme_blocks():
        if reason is not None:
            continue
        where = f"README.md:{line}"
        if language == "python":
            exec(compile(code, where, "exec"), namespace)  # noqa: S102 (the README's own examples)
        else:
            for words in shell_commands(code):
                for args in fastcap_args(words):
                    try:
                        status = main(args)
                    except SystemExit as exit_:  # --help
                        status = exit_.code
                    assert status in (0, None), f"{where}: fastcap {' '.join(args)} exited with {status}"
        ran += 1
    assert ran >= 6
