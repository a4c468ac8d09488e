"""The bounded readers (oneke_plan.io.jsonfile, oneke_plan.io.yamlfile): what real files hold reads exactly as the
standard parsers read it; alias bombs, deep nesting, huge integers and lone surrogates are refused at their line;
every file the tools parse goes through them (oneke-plan's side here; oneke-run's in test_cli_run_errors)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from hostile import billion_laughs, deep_list

from oneke_plan.cli.plan import main as plan_main
from oneke_plan.core.errors import BadInput
from oneke_plan.io import jsonfile
from oneke_plan.io.limits import MAX_NESTING
from oneke_plan.io.yamlfile import read_yaml
from oneke_plan.measure.checkpoint import read_checkpoint

# -- JSON ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        '{"a": [1, 2.5, "x", null, true], "b": {"c": "\\ud83d\\ude00"}}',  # an escaped surrogate *pair* is fine
        '"\\\\ud800"',  # an escaped backslash, then the letters ud800: plain text
        '["[[[[", "{{{{"]' + " " * 10,  # brackets inside strings are no nesting
        "[" * MAX_NESTING + "]" * MAX_NESTING,  # exactly the bound
        "1" * 4000,
        "NaN",
    ],
)
def test_json_that_real_files_hold_reads_as_json_loads_reads_it(text: str) -> None:
    expected = json.loads(text)
    got = jsonfile.loads(text)
    assert json.dumps(got) == json.dumps(expected)


@pytest.mark.parametrize(
    ("text", "needle", "line", "column"),
    [
        ("[" * (MAX_NESTING + 1) + "]" * (MAX_NESTING + 1), "nested deeper", 1, MAX_NESTING + 1),
        ('{\n "a": ' + deep_list(), "nested deeper", 2, 6 + MAX_NESTING),  # the { is the first level
        ('{"a":\n' + "9" * 5000 + "}", "digits", 2, 1),
        ('{"a": "ok",\n "b": "x\\ud800y"}', "lone surrogate", 2, 9),
        ('["\\ud83d\\ude00", "\\udc00"]', "lone surrogate", 1, 19),  # a low half alone, after a good pair
        ('["\\ud83d x"]', "lone surrogate", 1, 3),  # a high half alone
    ],
)
def test_json_beyond_a_bound_is_a_decode_error_with_its_place(text: str, needle: str, line: int, column: int) -> None:
    with pytest.raises(json.JSONDecodeError) as caught:
        jsonfile.loads(text)
    assert needle in caught.value.msg and (caught.value.lineno, caught.value.colno) == (line, column)


def test_read_json_file_names_the_file_and_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "config.json"
    path.write_text('{"a": 1,\n "b": ' + deep_list() + "}")
    with pytest.raises(BadInput, match=rf"^{path}:2: nested deeper than {MAX_NESTING} levels"):
        jsonfile.read_json_file(path, "fix it")
    path.write_text('{"a": ' + json.dumps("x" * 100) + "}")
    monkeypatch.setattr(jsonfile, "MAX_JSON_BYTES", 50)
    with pytest.raises(BadInput, match=rf"^{path}: larger than"):
        jsonfile.read_json_file(path, "fix it")


# -- YAML ------------------------------------------------------------------------------------------------------------


def test_yaml_that_profiles_hold_reads_as_safe_load_reads_it(tmp_path: Path) -> None:
    text = (Path(__file__).parents[2] / "profiles" / "oneke-24gib+12gib-bf16.yaml").read_text(encoding="utf-8")
    text += "extra: {emoji: \"\\U0001F600\", big: 123456789012345678901234567890, inf: .inf, merge: {<<: {a: 1}}}\n"
    path = tmp_path / "p.yaml"
    path.write_text(text, encoding="utf-8")
    assert read_yaml(path, "profile", "fix it") == yaml.safe_load(text)


@pytest.mark.parametrize(
    ("text", "needle", "line"),
    [
        (billion_laughs(), "aliases", 2),  # refused at the first alias, before anything is expanded
        ("a: &x 1\nb: *x\n", "aliases", 2),
        ("a: 1\nb: {<<: *x}\n", "aliases", 2),
        ("gpus:\n  - " + deep_list() + "\n", "nested deeper", 2),
        ("a: 1\n" + "b:\n" + "".join("  " * i + "- \n" for i in range(1, 200)), "nested deeper", None),
        ("cpu_memory: " + "9" * 5000 + "\n", "integer too long", 1),
        ('a: 1\nb: "\\ud800"\n', "lone surrogate", 2),
    ],
)
def test_yaml_beyond_a_bound_is_one_line_naming_the_file_and_line(
    tmp_path: Path, text: str, needle: str, line: int | None
) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(BadInput) as caught:
        read_yaml(path, "profile", "fix it")
    message = str(caught.value)
    assert needle in message and "\n" not in message, message
    if line is not None:
        assert message.startswith(f"{path}:{line}: "), message


def test_yaml_too_large_is_refused_before_parsing(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("# padding\n" * 120_000 + "gpus: []\n")  # 1.2 MB: valid, but no profile is that large
    with pytest.raises(BadInput, match="larger than 1.00 MiB"):
        read_yaml(path, "profile", "fix it")


# -- every file oneke-plan parses --------------------------------------------------------------------------------------


def _plan_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code = plan_main([*argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize(
    ("text", "needle", "line"),
    [
        (billion_laughs(), "aliases", 2),
        ("gpus: " + deep_list() + "\n", "nested deeper", 1),
        ("gpus: []\ncpu_memory: " + "9" * 5000 + "\n", "integer too long", 2),
        ("gpus: []\ncpu_memory: " + "9" * 400 + "GiB\n", "larger than any memory", None),
        ("gpus:\n  - {name: \"\\ud800\"}\n", "lone surrogate", 2),
    ],
)
def test_hostile_inventory_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, text: str, needle: str, line: int | None
) -> None:
    path = tmp_path / "inventory.yaml"
    path.write_text(text, encoding="utf-8")
    message = _plan_error(capsys, "oneke", "--inventory", str(path))
    assert needle in message and str(path) in message, message
    if line is not None:
        assert f"{path}:{line}: " in message, message


def _before_hidden_act(value: str):  # type: ignore[no-untyped-def]
    return lambda text: text.replace('"hidden_act"', f'"extra": {value},\n  "hidden_act"')


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (_before_hidden_act(deep_list()), "nested deeper"),
        (lambda text: text.replace('"llama"', '"\\ud800"'), "lone surrogate"),
        (_before_hidden_act("9" * 5000), "digits"),
        (lambda text: text[: len(text) // 2], "not valid JSON"),
    ],
)
def test_hostile_config_json_is_one_line_naming_its_line(
    capsys: pytest.CaptureFixture[str], tiny_model_dir: Path, tmp_path: Path, change, needle: str
) -> None:  # type: ignore[no-untyped-def]
    model = tmp_path / "model"
    model.mkdir()
    text = (tiny_model_dir / "config.json").read_text(encoding="utf-8")
    changed = change(text)
    assert changed != text
    (model / "config.json").write_text(changed, encoding="utf-8")
    message = _plan_error(capsys, str(model), "--gpu", "24GiB")
    first_difference = next((i for i, (a, b) in enumerate(zip(text, changed, strict=False)) if a != b), len(changed))
    line = changed.count("\n", 0, first_difference) + 1
    assert needle in message and message.startswith(f"oneke-plan: error: {model / 'config.json'}:"), message
    if needle != "not valid JSON":  # a cut file is found wrong where it ends, not where it was cut
        assert f"config.json:{line}: " in message, message


def test_offload_dir_that_is_a_file_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "offload").write_text("my file")
    message = _plan_error(capsys, "oneke", "--gpu", "8GiB", "--offload-dir", str(tmp_path / "offload"))
    assert "is a file, not a folder" in message


def test_raw_input_in_a_folder_whose_name_is_not_utf8_gets_a_writable_source(tmp_path: Path) -> None:
    """The authors' `source` is the input's folder name; a name that is not UTF-8 (bytes 0xff) comes with a
    replacement character instead of a surrogate escape, so the answer line can be written."""
    import os

    from oneke_plan.extract.answer_lines import encode_line, error_line
    from oneke_plan.extract.inputs import read_raw

    folder = os.path.join(os.fsencode(tmp_path), b"data-\xff")
    os.mkdir(folder)
    path = os.path.join(folder, b"in.jsonl")
    with open(path, "wb") as handle:
        handle.write(b'{"text": "OneKE"}\n')
    records = read_raw(os.fsdecode(path), "NER", ["person"], "en")
    assert records[0].extra["source"] == "data-\ufffd"
    assert json.loads(encode_line(error_line(records[0], "x")))["source"] == "data-\ufffd"


def test_an_input_line_beyond_the_bound_is_one_line_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from oneke_plan.extract import inputs

    path = tmp_path / "in.jsonl"
    path.write_text('{"id": 1, "instruction": "short"}\n{"id": 2, "instruction": "' + "x" * 200 + '"}\n')
    # an answer file's line (oneke-score): 16 MiB for real (an input line's own bound: test_hostile_inputs.py)
    monkeypatch.setattr(inputs, "MAX_ANSWER_LINE_BYTES", 100)
    with pytest.raises(BadInput, match=rf"^{path}, line 2: longer than"):
        inputs.read_json_objects(path)


# -- a model's own files are regular files: never waited on -----------------------------------------------------------


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_a_fifo_among_a_models_json_files_is_refused_unopened(
    tiny_sharded_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, no_hang: None
) -> None:
    """A FIFO has no writer here (no_hang). generation_config.json, read by oneke-run only: test_hostile_tokenizer."""
    import os
    import shutil

    folder = Path(shutil.copytree(tiny_sharded_dir, tmp_path / "model"))
    assert (folder / name).is_file()  # a file the model really has, so its reader is really reached
    (folder / name).unlink()
    os.mkfifo(folder / name)

    if name == "config.json":  # oneke-plan reads it; the index only the run's checkpoint check does
        code = plan_main([str(folder), "--gpu", "24GiB", "-o", str(tmp_path / "p.yaml")])
        err = capsys.readouterr().err.strip().splitlines()
    else:
        with pytest.raises(BadInput) as refused:
            read_checkpoint(folder)
        code, err = refused.value.exit_code, [str(refused.value)]
    assert code == 2
    assert len(err) == 1 and f"{name}: is a FIFO (named pipe), not a regular file" in err[0], err
