"""The README cannot drift from the program: its fenced blocks are parsed and checked against the real thing.

Generic over README.md (any section, present or future):

- every ```bash block: each command is split off (`&&`, `;`, `|`, line continuations, comments); a script or
  config it names must exist; the options of `train.py` (through `accelerate launch` / `torchrun` / `python`),
  `label_with_llm.py` and `merits` are parsed by their real parsers (placeholders such as `OUT`, `DIR` or `...`
  are fine as values, an unknown option is not); other repository scripts must contain every `--flag` given to
  them; `pip install` extras must exist in pyproject.toml; pytest `-m` expressions may name only declared markers;
- the README's test command is the command `.ci/run` runs, and the install lines of both agree;
- every ```python block compiles and its imports import; a block with no free names (a complete example) is run
  against a tiny model folder at `outputs/demo/best`;
- an output example (`# -> [{...}]` in a python block) names only keys the pipeline really returns, and the
  gate's expert names are the model's;
- the flat `all_results.json` keys named in the README in backticks are keys a run writes;
- the end-of-run summary shown in a ```text block is what `merits.training.report.run_summary` prints.
"""

from __future__ import annotations

import argparse
import ast
import builtins
import json
import re
import shlex
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

# ---------------------------------------------------------------------------------------------- parsing
def fenced_blocks(text: str) -> list[tuple[str, str, int]]:
    """``(language, body, line number)`` of every fenced block."""
    blocks, language, body, start = [], None, [], 0
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if language is None and stripped.startswith("```"):
            language, body, start = stripped[3:].strip().lower(), [], number
        elif language is not None and stripped == "```":
            blocks.append((language, "\n".join(body), start))
            language = None
        elif language is not None:
            body.append(line)
    assert language is None, f"README.md:{start}: unclosed ``` block"
    return blocks


def _strip_comment(line: str) -> str:
    """The line without a trailing `# comment` (a # inside quotes is kept)."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            if char == quote:
                quote = None
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def bash_commands(body: str) -> list[list[str]]:
    """The simple commands of a bash block, each as shlex tokens."""
    joined, logical = "", []
    for raw in body.splitlines():
        line = _strip_comment(raw).rstrip()
        if line.endswith("\\"):
            joined += line[:-1] + " "
            continue
        joined += line
        if joined.strip():
            logical.append(joined)
        joined = ""
    commands = []
    for line in logical:
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        current = []
        for token in lexer:
            if token in ("&&", "||", ";", "|", "&"):
                if current:
                    commands.append(current)
                current = []
            else:
                current.append(token)
        if current:
            commands.append(current)
    return commands


def _readme_blocks(language: str) -> list[tuple[str, int]]:
    return [(body, line) for lang, body, line in fenced_blocks(README.read_text()) if lang == language]


def _all_bash_commands() -> list[tuple[list[str], int]]:
    return [(command, line) for body, line in _readme_blocks("bash") for command in bash_commands(body)]


# ---------------------------------------------------------------------------------------------- bash blocks
def _train_options(argv: list[str], where: str) -> None:
    from merits.training.arguments import (ConfigError, HelpRequested, StageArguments, TrainingArguments, _field_types,
                                           parse_args, parse_cli)

    if "--help" in argv or "-h" in argv:
        return
    if "..." in argv:  # an elided command: check the option names (and a --config file) only
        fields, stage_fields = _field_types(TrainingArguments), _field_types(StageArguments)
        for key, value in parse_cli(argv):
            head, _, rest = key.partition(".")
            assert head in fields, f"{where}: train.py has no option --{key}"
            if rest and fields[head] is StageArguments:
                assert rest in stage_fields, f"{where}: train.py has no stage option --{key}"
            if key == "config" and value != "...":
                assert (REPO / value).is_file(), f"{where}: --config {value} does not exist"
        return
    try:
        parse_args(argv)  # placeholders such as OUT or DIR are valid strings; nothing is read but --config
    except (ConfigError, HelpRequested) as error:
        pytest.fail(f"{where}: train.py {' '.join(argv)}: {error}")


def _argparse_check(parser: argparse.ArgumentParser, argv: list[str], where: str) -> None:
    import contextlib
    import io

    if "--help" in argv or "-h" in argv:
        return
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: {parser.prog} {' '.join(argv)}: {stderr.getvalue().strip().splitlines()[-1:]}")


def _script_flags(script: Path, argv: list[str], where: str) -> None:
    source = script.read_text()
    # a thin entry point (`from merits.x import main`): its options live in that module
    for module in re.findall(r"^from (merits[\w.]*) import", source, flags=re.M):
        path = REPO.joinpath(*module.split(".")).with_suffix(".py")
        if path.is_file():
            source += path.read_text()
    for token in argv:
        if token.startswith("--"):
            flag = token.split("=", 1)[0]
            assert f'"{flag}"' in source or f"'{flag}'" in source, f"{where}: {script.name} has no option {flag}"


def _pip_extras(argv: list[str], where: str) -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = set(project.get("optional-dependencies", {}))
    for token in argv:
        match = re.fullmatch(r"\.\[([\w,\s-]+)\]", token)
        if match:
            for extra in match.group(1).split(","):
                assert extra.strip() in extras, f"{where}: pyproject.toml has no extra [{extra.strip()}]"


def _pytest_markers(argv: list[str], where: str) -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    declared = {marker.split(":", 1)[0].strip() for marker in config.get("markers", [])}
    for i, token in enumerate(argv):
        if token == "-m" and i + 1 < len(argv) and i > 0:  # argv[0] is python's own -m
            words = set(re.findall(r"[A-Za-z_]\w*", argv[i + 1])) - {"and", "or", "not"}
            assert words <= declared, f"{where}: pytest -m {argv[i + 1]!r} names undeclared markers {words - declared}"


def check_command(command: list[str], where: str) -> None:
    """One README command against the real program."""
    while command and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", command[0]):  # VAR=value prefixes
        command = command[1:]
    if not command:
        return
    program, args = command[0], command[1:]
    if program in ("accelerate", "torchrun") or (program in ("python", "python3") and args[:1] != ["-m"]):
        if program == "accelerate" and args[:1] != ["launch"]:
            return  # accelerate config / env ...
        script_index = next((i for i, t in enumerate(args) if t.endswith((".py", ".sh"))), None)
        if script_index is None:
            return
        script, rest = args[script_index], args[script_index + 1:]
        path = REPO / script
        assert path.is_file(), f"{where}: {script} does not exist"
        if path.name == "train.py" and path.parent == REPO:
            _train_options(rest, where)
        elif path.name == "label_with_llm.py" and path.parent == REPO:
            if rest[:1] == ["merge"]:
                from merits.labelling.shards import build_merge_parser

                _argparse_check(build_merge_parser(), rest[1:], where)
            else:
                from merits.labelling.run import build_parser

                _argparse_check(build_parser(), rest, where)
        else:
            _script_flags(path, rest, where)
    elif program == "merits":
        from merits.cli import build_parser

        _argparse_check(build_parser(), args, where)
    elif program == "bash":
        assert args and (REPO / args[0]).is_file(), f"{where}: {args[:1]} does not exist"
    elif program in ("pip", "pip3") or (program in ("python", "python3") and args[:3] == ["-m", "pip", "install"]):
        _pip_extras(args, where)
    elif program in ("python", "python3") and args[:2] == ["-m", "pytest"]:
        _pytest_markers(args, where)
        for token in args[2:]:
            if token.startswith("tests/"):
                assert (REPO / token.split("::")[0]).exists(), f"{where}: {token} does not exist"
    for token in args:  # any other repository path named by the command
        if re.fullmatch(r"(configs|scripts|bench|tests)/[\w./-]+\.(py|sh|yaml|yml)", token):
            assert (REPO / token).is_file(), f"{where}: {token} does not exist"


def test_readme_bash_commands_name_real_scripts_flags_and_configs():
    commands = _all_bash_commands()
    assert len(commands) >= 10, "the README's bash blocks were not found"
    for command, line in commands:
        check_command(command, f"README.md:{line} `{' '.join(command)}`")


def test_the_checker_catches_drift():
    """The checks above can fail: a wrong option, config, extra or marker is reported."""
    bad = [
        ["accelerate", "launch", "train.py", "--learning_rate", "1e-4"],
        ["accelerate", "launch", "train.py", "--config", "configs/no_such.yaml", "--output_dir", "OUT"],
        ["python", "label_with_llm.py", "--transcripts", "t.csv", "--out", "o", "--llm-model", "m", "--no-such-flag", "2"],
        ["merits", "predict", "--model", "OUT/best", "in.jsonl", "-o", "out.jsonl", "--no-such-flag", "x"],
        ["pip", "install", "-e", ".[no-such-extra]"],
        ["python", "-m", "pytest", "-q", "-m", "not quick"],
        ["bash", "scripts/no_such.sh"],
    ]
    for command in bad:
        with pytest.raises((AssertionError, pytest.fail.Exception)):
            check_command(command, "synthetic")


def _install_and_test_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if "python -m pytest" in line and not line.lstrip().startswith("#")]


def test_the_readme_test_command_is_what_ci_runs():
    ci = _install_and_test_lines((REPO / ".ci" / "run").read_text())
    assert len(ci) == 1, ci
    readme = [line for body, _ in _readme_blocks("bash") for line in _install_and_test_lines(body)]
    assert ci[0] in [_strip_comment(line).strip() for line in readme], (ci[0], readme)


# ---------------------------------------------------------------------------------------------- python blocks
def _free_names(tree: ast.AST) -> set[str]:
    assigned, loaded = set(dir(builtins)), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (loaded if isinstance(node.ctx, ast.Load) else assigned).add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            assigned.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            assigned.add(node.name)
        elif isinstance(node, ast.arg):
            assigned.add(node.arg)
    return loaded - assigned


def _has_ellipsis(tree: ast.AST) -> bool:
    return any(isinstance(node, ast.Constant) and node.value is Ellipsis for node in ast.walk(tree))


def test_readme_python_blocks_compile_and_import():
    blocks = _readme_blocks("python")
    assert blocks
    for body, line in blocks:
        tree = compile(body, f"README.md:{line}", "exec", flags=ast.PyCF_ONLY_AST)
        imports = ast.Module(body=[n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))],
                             type_ignores=[])
        exec(compile(imports, f"README.md:{line} (imports)", "exec"), {})


@pytest.fixture(scope="module")
def demo_like_folder(tmp_path_factory):
    """A tiny MERITS-L Hub folder at `outputs/demo/best` and a tiny MiSTER-E one at `outputs/demo/mister-e/best`."""
    sys.path.insert(0, str(REPO / "tests"))
    from test_hub import build_case

    from merits import save_hub_folder

    root = tmp_path_factory.mktemp("readme")
    for case, folder in (("merits-l-acoustic", "outputs/demo/best"), ("mister-e-backbones", "outputs/demo/mister-e/best")):
        model, processor, _, _ = build_case(case)
        save_hub_folder(model, processor, root / folder)
    return root


def test_complete_readme_python_examples_run(demo_like_folder, monkeypatch):
    """A python block with no free names and no `...` is a complete example: it runs as printed, offline, against
    tiny model folders where the README names outputs/demo (wav files it names are synthesized)."""
    import numpy as np
    import soundfile

    monkeypatch.chdir(demo_like_folder)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ran = 0
    for body, line in _readme_blocks("python"):
        tree = ast.parse(body)
        if _free_names(tree) or _has_ellipsis(tree):
            continue
        for name in set(re.findall(r"[\"']([\w./-]+\.wav)[\"']", body)):
            soundfile.write(name, 0.1 * np.sin(np.linspace(0, 800, 16000)).astype(np.float32), 16000)
        exec(compile(body, f"README.md:{line}", "exec"), {"__name__": "__readme__"})
        ran += 1
    assert ran >= 1, "no complete python example in the README"


def _example_dicts(body: str) -> list[str]:
    return [m.group(1) for m in re.finditer(r"#\s*->\s*\[(\{.*)", body)]


def test_readme_output_examples_name_the_real_keys(demo_like_folder):
    from transformers import pipeline

    outputs = {}
    for key, folder in (("merits-l", "outputs/demo/best"), ("mister-e", "outputs/demo/mister-e/best")):
        recognise = pipeline("conversation-emotion-recognition", model=str(demo_like_folder / folder),
                             trust_remote_code=True)
        outputs[key] = recognise([{"text": "hello there"}, {"text": "why?"}])[0]
    real_keys = set(outputs["merits-l"]) | set(outputs["mister-e"])
    gate_names = set(outputs["mister-e"]["gate"])
    assert "gate" not in outputs["merits-l"]
    examples = [example for body, _ in _readme_blocks("python") for example in _example_dicts(body)]
    assert examples, "no `# -> [{...}]` output example in the README"
    text = README.read_text()
    for example in examples:
        outer = re.sub(r"\{[^{}]*\}", "{}", example[1:])  # the nested dicts (scores, gate) emptied
        top = set(re.findall(r"[\"'](\w[\w-]*)[\"']\s*:", outer))
        assert top <= real_keys, f"README output example names keys the pipeline does not return: {top - real_keys}"
    for match in re.finditer(r"[\"']gate[\"']\s*:\s*\{([^}]*)\}", text):
        named = set(re.findall(r"[\"']([\w-]+)[\"']", match.group(1)))
        assert named == gate_names, f"README gate keys {named} != the model's {gate_names}"


# ---------------------------------------------------------------------------------------------- results keys
def test_readme_results_keys_are_written_by_a_run():
    """Every `validation_...` / `test_...` key the README names in backticks is one a run writes: the metrics of
    the stage/head naming scheme (checked on a real run in test_training; here against the scheme's parts)."""
    from merits.training.report import _ROWS

    metrics = {"weighted_f1", "accuracy", "unweighted_average_recall", "macro_f1", "num_examples"}
    known = set()
    for split in ("validation", "test"):
        for metric in metrics:
            known.add(f"{split}_{metric}")
            for tag, head, _ in _ROWS:
                known.add(f"{split}_{tag}_{head + '_' if head else ''}{metric}")
    named = set(re.findall(r"`((?:validation|test)_[a-z0-9_+]+)`", README.read_text()))
    assert named, "the README names no results key"
    assert named <= known, f"README names results keys no run writes: {sorted(named - known)}"


# ---------------------------------------------------------------------------------------------- run summary
def test_readme_run_summary_is_what_train_prints(tmp_path, monkeypatch):
    """The ```text block that starts with `Done.` is the summary printed at the end of the demo run, up to the
    figures (the same layout: outputs/demo with both systems, 3 + 4 confusion matrices, the demo's examples)."""
    from merits.training.report import run_summary

    summaries = [body for body, _ in _readme_blocks("text") if body.lstrip().startswith("Done.")]
    assert len(summaries) == 1, "the README shows no end-of-run summary (a ```text block starting with `Done.`)"
    monkeypatch.chdir(tmp_path)
    out = Path("outputs/demo")
    for system, count in (("merits-l", 5), ("mister-e", 8)):
        (out / system / "confusion_matrices").mkdir(parents=True)
        for i in range(count):
            (out / system / "confusion_matrices" / f"{i}.png").write_bytes(b"")
        (out / system / "features.json").write_text(json.dumps({"test": f"outputs/demo/cache/test-{system}"}))
    examples = out / "examples" / "conversations.jsonl"
    per_system = {"merits-l": {"validation_weighted_f1": 0.8374}, "mister-e": {"validation_weighted_f1": 0.8297}}
    printed = run_summary(out, per_system, "merits-l", examples=examples, toy=True)
    mask = lambda text: [re.sub(r"\d+\.\d+|\b\d+\b|[0-9a-f]{16}", "N", line).rstrip() for line in text.strip().splitlines()]
    readme = mask(summaries[0])
    for expected in mask(printed):
        if expected.startswith("  merits evaluate --model outputs/demo/best --dataset features"):
            expected = expected.split(" --file ")[0]  # the cache folder's name is a fingerprint
            assert any(line.startswith(expected) for line in readme), expected
            continue
        assert expected in readme, f"run_summary prints {expected!r}, the README's example does not show it"
