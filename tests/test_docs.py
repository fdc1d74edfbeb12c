"""The docs show commands that work: every ``securefl`` command line in a fenced block of
docs/*.md, README.md and attacks/README.md is extracted (new docs are covered without a
change here).  Every one must parse with the real argument parser and name repository files
that exist; those that run in a few seconds (``check``, ``certs``, ``--help``, ``--version``)
are run, and must not fail with a usage error or a traceback."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from securefl.cli import _parser

ROOT = Path(__file__).parents[1]
DOCS = sorted([*ROOT.glob("docs/*.md"), ROOT / "README.md", ROOT / "attacks" / "README.md"])
#: a synopsis (``securefl run CONFIG [--out DIR]``), not a command to run as written
_SYNOPSIS = re.compile(r"\[|\||\.\.\.|\b[A-Z][A-Z_]{2,}\b(?![.\w])|<|>| / ")
#: commands that finish in a few seconds on any machine
_QUICK = ("check", "certs", "--help", "--version")
_REPO_PATH = re.compile(r"^(examples|attacks|threat_models|docs)/")


@dataclass(frozen=True)
class Command:
    where: str
    argv: tuple[str, ...]
    synopsis: bool
    #: the output a ``$ securefl ...`` line shows under it, up to the next ``$`` or the end
    output: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"{self.where}: securefl {' '.join(self.argv)}"


def _fenced_lines(text: str) -> list[tuple[int, str]]:
    lines, inside = [], False
    for number, line in enumerate(text.splitlines(), start=1):
        if line.lstrip().startswith(("```", "~~~")):
            inside = not inside
        elif inside:
            lines.append((number, line))
    return lines


def documented_commands() -> list[Command]:
    found = []
    for doc in DOCS:
        fenced = _fenced_lines(doc.read_text(encoding="utf-8"))
        index = 0
        while index < len(fenced):
            number, line = fenced[index]
            prompt = line.strip().startswith("$ ")
            text = line.strip().removeprefix("$ ").strip()
            while text.endswith("\\") and index + 1 < len(fenced):
                index += 1
                text = text[:-1] + " " + fenced[index][1].strip()
            index += 1
            output: list[str] = []
            while prompt and index < len(fenced) and fenced[index][0] == number + 1 + len(
                    output) and not fenced[index][1].startswith("$"):
                output.append(fenced[index][1])
                index += 1
            if not text.startswith("securefl ") or text.startswith("securefl."):
                continue
            words = re.split(r"\s{2,}", text)[0]  # a table's description column is not part
            words = words.split(" #")[0].strip()
            synopsis = bool(_SYNOPSIS.search(words))
            argv = tuple(words.split()[1:]) if synopsis else tuple(shlex.split(words)[1:])
            found.append(Command(f"{doc.relative_to(ROOT)}:{number}", argv, synopsis,
                                 tuple(output)))
    return found


COMMANDS = documented_commands()


def test_the_docs_show_commands() -> None:
    assert len(COMMANDS) >= 20 and sum(not c.synopsis for c in COMMANDS) >= 10


@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_each_documented_command_parses_and_names_files_that_exist(command: Command) -> None:
    parser = _parser()
    if command.synopsis:
        # the sub-command path of a synopsis exists: `securefl privacy audit CONFIG ...`
        path = [w for w in command.argv[:2] if re.fullmatch(r"[a-z-]+", w)]
        with pytest.raises(SystemExit) as done:
            parser.parse_args([*path, "--help"])
        assert done.value.code == 0, command
        return
    try:
        parser.parse_args(list(command.argv))
    except SystemExit as done:
        assert done.code == 0, f"{command} is not a valid command line"
    for word in command.argv:
        if _REPO_PATH.match(word) and "*" not in word and not word.startswith("attacks/RESULTS"):
            assert (ROOT / word).exists(), f"{command}: {word} does not exist"


def _quick_by_doc() -> dict[str, list[Command]]:
    by_doc: dict[str, list[Command]] = {}
    for command in COMMANDS:
        if not command.synopsis and command.argv and command.argv[0] in _QUICK:
            by_doc.setdefault(command.where.split(":")[0], []).append(command)
    return by_doc


@pytest.mark.parametrize("doc", sorted(_quick_by_doc()))
def test_the_quick_commands_of_each_doc_run_in_order(doc: str, tmp_path: Path) -> None:
    """As a reader follows the page: in one folder, in the page's order, with the example
    deployment configs (server.toml, client.toml) that the pages start from."""
    for example in (ROOT / "examples" / "deployment").glob("*.toml"):
        (tmp_path / example.name).write_text(example.read_text(encoding="utf-8"))
    for command in _quick_by_doc()[doc]:
        argv = [str(ROOT / w) if _REPO_PATH.match(w) else w for w in command.argv]
        proc = subprocess.run([sys.executable, "-m", "securefl.cli", *argv],
                              capture_output=True, text=True, cwd=tmp_path, timeout=120,
                              env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
        assert "Traceback" not in proc.stderr, f"{command}\n{proc.stderr}"
        assert proc.returncode in (0, 1), f"{command}: exit {proc.returncode}\n{proc.stderr}"
        if command.output:  # the page shows what the command prints
            shown = proc.stdout.replace(f"{ROOT}/", "").splitlines()
            assert len(shown) == len(command.output), (command, shown)
            for printed, documented in zip(shown, command.output, strict=True):
                # "4a22dd0b…" in the page stands for what differs per run (a fingerprint)
                pattern = ".*".join(map(re.escape, re.split(r"[0-9a-f]*…", documented)))
                assert re.fullmatch(pattern, printed), (command, printed, documented)
