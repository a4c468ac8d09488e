"""Numbers typed by users: only ASCII digits are digits (oneke_plan.core.sizes.parse_int, parse_number, parse_size).

Python's int() and float() read every Unicode decimal digit ('٣', fullwidth '３'), underscores and Unicode spaces;
str.isdigit() also accepts superscripts that int() refuses ('²'), which is how `--reserve ²=1GiB` ended in an
internal error. Each case goes through the three parsers, then through every flag and inventory field that takes an
index, a count, a size or a rate: exit 2 and one line, never exit 1 or a value read from a digit of another script.
"""

from __future__ import annotations

import json
import random
import sys
import unicodedata
from pathlib import Path

import pytest

from oneke_plan.cli.plan import main as plan_main
from oneke_plan.cli.run import main as run_main
from oneke_plan.core.sizes import MAX_NUMBER_CHARS, GiB, NumberError, parse_int, parse_number, parse_size

pytestmark = pytest.mark.newest_only  # the tool's own rules: no library version changes them

NON_ASCII_DIGITS = [
    chr(c) for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) == "Nd" and not "0" <= chr(c) <= "9"
]
LOOK_LIKE_DIGITS = ["²", "¹", "³", "⁰", "₂", "①", "⑴", "Ⅻ", "½", "𝟚", "٫"]  # isdigit or isnumeric, not ASCII digits
SIGNS_AND_SPACES = ["+1", "−1", "1_000", "1 000", "\u30001", "1\u3000", "\xa01", "1\n", "\t\n1", "0x10", "1e", ""]
HUGE = ["9" * 19, "9" * MAX_NUMBER_CHARS, "9" * 100_000, "1" + "0" * 400]


def test_there_are_hundreds_of_unicode_digits_python_reads_as_numbers() -> None:
    """The premise: int() and float() take them (so a check on the digits alone is needed), isdigit says yes."""
    assert len(NON_ASCII_DIGITS) > 600
    assert all(int(d) == unicodedata.digit(d) and d.isdigit() for d in NON_ASCII_DIGITS)
    assert "²".isdigit() and not "²".isdecimal()


@pytest.mark.parametrize("digit", NON_ASCII_DIGITS + LOOK_LIKE_DIGITS)
def test_a_digit_of_another_script_is_no_digit(digit: str) -> None:
    for text in (digit, f"1{digit}", f"{digit}1"):
        with pytest.raises(NumberError):
            parse_int(text, "index")
        with pytest.raises(NumberError):
            parse_number(text, "rate")
        with pytest.raises(NumberError):
            parse_number(f"{text}.5", "rate")
        with pytest.raises(NumberError):
            parse_size(f"{text}GiB")
        with pytest.raises(NumberError):
            parse_size(text)


@pytest.mark.parametrize("text", SIGNS_AND_SPACES + HUGE, ids=ascii)
def test_signs_spaces_and_huge_numbers(text: str) -> None:
    with pytest.raises(NumberError):
        parse_int(text, "index")
    with pytest.raises(NumberError):
        parse_size(text + "GiB")
    with pytest.raises(NumberError):
        parse_number(text + "x", "rate")


def test_what_is_accepted_reads_exactly() -> None:
    assert [parse_int(t, "x") for t in ("0", "7", " 12\t", "000003")] == [0, 7, 12, 3]
    assert parse_int("-1", "x", negative=True) == -1
    with pytest.raises(NumberError, match="negative"):
        parse_int("-1", "x")
    assert parse_int("9" * 18, "x") == 10**18 - 1
    assert [parse_number(t, "x") for t in ("936", "19.5", ".5", "1e3", " 7. ")] == [936.0, 19.5, 0.5, 1000.0, 7.0]
    assert parse_size("24GiB") == 24 * GiB and parse_size(" 1.5 GiB ") == 3 * GiB // 2
    assert parse_size("9007199254740993") == 9007199254740993  # exactly: no float rounding of a bare integer
    assert parse_size("8Gb") == 10**9  # accelerate's bits


# -- through the command lines -----------------------------------------------------------------------------------------

# A fixed sample of the ~700 non-ASCII digits (every one goes through the parsers above), and the look-alikes.
SAMPLE = random.Random(30).sample(NON_ASCII_DIGITS, 12) + ["²", "３", "①", "𝟚"]
BAD = [*SAMPLE, "1_0", "\u30001", "−1", "9" * 40, "9" * 100_000]


def _plan_argv(bad: str) -> list[list[str]]:
    """oneke-plan command lines, one per flag that reads an index, a count, a size or a rate from `bad`."""
    gpu = ["--gpu", "24GiB"]
    return [
        ["--gpu", f"{bad}GiB"],
        ["--gpu", f"RTX 3090:{bad}GiB"],
        [*gpu, "--cpu-memory", f"{bad}GiB"],
        [*gpu, "--reserve", f"{bad}=1GiB"],
        [*gpu, "--reserve", f"0={bad}GiB"],
        [*gpu, "--reserve", f"{bad}GiB"],
        [*gpu, "--bandwidth", f"{bad}=900"],
        [*gpu, "--bandwidth", f"0={bad}"],
        [*gpu, "--bandwidth", bad],
        [*gpu, "--tflops", f"{bad}=70"],
        [*gpu, "--tflops", f"cpu={bad}"],
        [*gpu, "--max-input-tokens", bad],
        [*gpu, "--max-new-tokens", bad],
        [*gpu, "--batch-size", bad],
        [*gpu, "--replicas", bad],
        [*gpu, "--nodes", bad],
    ]


def _exit_and_lines(main, argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:  # type: ignore[no-untyped-def]
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("bad", BAD, ids=ascii)
def test_every_number_flag_of_oneke_plan_refuses_it_in_one_line(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in _plan_argv(bad):
        code, lines = _exit_and_lines(plan_main, ["oneke", *argv], capsys)
        assert code == 2 and len(lines) == 1, (argv, code, lines)
        assert "internal error" not in lines[0]


@pytest.mark.parametrize("bad", BAD, ids=ascii)
def test_every_number_field_of_an_inventory_refuses_it_in_one_line(
    bad: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    entries = [
        f"{{memory: '{bad}GiB'}}",
        f"{{memory: 24GiB, reserve: '{bad}GiB'}}",
        f"{{memory: 24GiB, bandwidth: '{bad}'}}",
        f"{{memory: 24GiB, tflops: '{bad}'}}",
        f"{{memory: 24GiB, compute_capability: '{bad}.6'}}",
        f"{{memory: 24GiB, compute_capability: '8.{bad}'}}",
        f"'{bad}GiB'",
    ]
    for entry in entries + ["{memory: 24GiB}\ncpu_memory: '" + bad + "GiB'"]:
        path = tmp_path / "machine.yaml"
        path.write_text(f"gpus:\n  - {entry}\n", encoding="utf-8")
        code, lines = _exit_and_lines(plan_main, ["oneke", "--inventory", str(path)], capsys)
        assert code == 2 and len(lines) == 1, (entry, code, lines)
        assert str(path) in lines[0] and "internal error" not in lines[0]


@pytest.mark.parametrize("bad", BAD, ids=ascii)
def test_every_number_flag_of_oneke_run_refuses_it_in_one_line(
    bad: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--profile", str(tmp_path / "p.yaml"), "--input", "in.json", "--output", str(tmp_path / "out.json")]
    raw = ["--task", "NER", "--schema", "[]"]
    for argv in (["--batch-size", bad], ["--max-new-tokens", bad], [*raw, "--chunk-size", bad]):
        code, lines = _exit_and_lines(run_main, [*base, *argv], capsys)
        assert code == 2 and len(lines) == 1, (argv, code, lines)
        assert "internal error" not in lines[0]


def test_ascii_values_of_the_same_flags_still_plan(capsys: pytest.CaptureFixture[str]) -> None:
    """The control: the same flags with ASCII digits plan (exit 0), so the refusals above are about the digits."""
    argv = ["oneke", "--gpu", "RTX 3090:24GiB", "--gpu", "24GiB", "--reserve", "1=1GiB", "--reserve", "900MiB"]
    argv += ["--bandwidth", "1=900", "--tflops", "cpu=1.5", "--cpu-memory", "0", "--max-input-tokens", "256"]
    argv += ["--max-new-tokens", "64", "--batch-size", "2", "--replicas", "1", "--nodes", "1"]
    code, lines = _exit_and_lines(plan_main, argv, capsys)
    assert code == 0, lines


@pytest.mark.parametrize("bad", ["３", "4", 4.0, True], ids=ascii)
def test_an_adapter_header_number_is_a_json_integer(bad: object, tmp_path: Path) -> None:
    """A safetensors header's shapes and offsets are JSON integers; int() read the string "３" as 3 (the adapter's
    header is read before safetensors' own reader ever sees the file)."""
    from oneke_plan.core.errors import BadInput
    from oneke_plan.measure.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_adapter

    def write(shape: list[object]) -> None:
        name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        header = json.dumps({name: {"dtype": "F32", "shape": shape, "data_offsets": [0, 64]}}).encode()
        (tmp_path / ADAPTER_WEIGHTS).write_bytes(len(header).to_bytes(8, "little") + header + bytes(64))

    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "bias": "none"}
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps(config))
    write([4, 4])
    with pytest.raises(BadInput, match="lora_B"):  # the control: the header is read, the pair is incomplete
        read_adapter(tmp_path)
    write([bad, 4])
    with pytest.raises(BadInput, match="not a valid safetensors file: .*not a list of non-negative integers"):
        read_adapter(tmp_path)
