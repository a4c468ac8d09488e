"""Messages a new user misreads, tried as a new user would: each mistake is one line on stderr, exit 2, that names
what was meant (the unit, the card, the flag, the device), and nothing else is printed before it.

- a GPU's memory as a bare number (`--gpu 24`, `--gpu 4090`, an inventory's `memory: 24`);
- a reserve that takes all of its device (`--reserve 30GiB` on a 24 GiB card);
- a misspelt flag, on every flag of every command (`--profle` is not a missing --profile);
- notes printed before a refusal (`oneke-run --template llama3` on a tokenizer without its tokens);
- oneke-score on files it cannot score (oneke-run's output of an unlabelled input, input files, JSON arrays) and
  two runs whose answers differ where their predictions do not (both unparsable);
- the --plot picture: every text inside the canvas and no two overlapping, measured with DejaVu Sans' own glyph
  widths read from the font file (an independent route from the picture's own estimate).
"""

from __future__ import annotations

import argparse
import itertools
import json
import struct
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from tiny_checkpoint import build_tiny_llama

from oneke_plan import api
from oneke_plan.cli import plan as plan_cli
from oneke_plan.cli import run as run_cli
from oneke_plan.cli import score as score_cli
from oneke_plan.core.errors import EXIT_BAD_INPUT
from oneke_plan.core.sizes import GiB
from oneke_plan.plan.report import text_width

pytestmark = pytest.mark.newest_only  # the tool's own rules: no library version changes them

SVG = "{http://www.w3.org/2000/svg}"
COMMANDS: dict[str, tuple[Callable[[list[str] | None], int], Callable[[], argparse.ArgumentParser]]] = {
    "oneke-plan": (plan_cli.main, plan_cli.build_parser),
    "oneke-run": (run_cli.main, run_cli.build_parser),
    "oneke-score": (score_cli.main, score_cli.build_parser),
}
SCHEMA = '["人物", "地点", "组织", "时间"]'


def one_line(capsys: pytest.CaptureFixture[str], prog: str, argv: list[Any], *needles: str) -> str:
    """Run `prog` with `argv`: exit 2, and stderr is exactly one line, 'prog: error: ...', holding every needle."""
    main = COMMANDS[prog][0]
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's own exit
        code = int(exc.code or 0)
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# -- a GPU's memory is never a bare number -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("gpu", "needles"),
    [
        ("24", ["--gpu 24:", "a bare number", "24GiB", "'RTX 4090'", "--list-cards"]),
        (" 24 ", ["a bare number", "24GiB"]),
        ("24.5", ["a bare number", "24.5GiB"]),
        ("4090", ["--gpu 4090:", "a bare number", "'RTX 4090'"]),
        ("3090", ["'RTX 3090'"]),
        ("RTX 3090:24", ["a bare number", "RTX 3090:24GiB"]),
        ("0", ["a bare number", "a size such as 24GiB", "'RTX 4090'"]),
    ],
)
def test_a_bare_number_is_not_a_gpu(capsys: pytest.CaptureFixture[str], gpu: str, needles: list[str]) -> None:
    one_line(capsys, "oneke-plan", ["oneke", f"--gpu={gpu}"], *needles)


@pytest.mark.parametrize(
    ("entry", "needles"),
    [
        ("- 24", ["gpus[0] 24", "a bare number", "24GiB"]),
        ('- "4090"', ["gpus[0] 4090", "'RTX 4090'"]),
        ("- {memory: 24}", ["gpus[0].memory 24", "a bare number", "24GiB"]),
        ("- {name: RTX 3090, memory: '24'}", ["gpus[0].memory 24", "24GiB"]),
    ],
)
def test_an_inventory_reads_gpu_memory_as_the_flag_does(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, entry: str, needles: list[str]
) -> None:
    path = tmp_path / "machine.yaml"
    path.write_text(f"gpus:\n  {entry}\n", encoding="utf-8")
    one_line(capsys, "oneke-plan", ["oneke", "--inventory", path], str(path), *needles)


def test_sizes_with_a_unit_and_the_other_sizes_bare_numbers_stay_as_they_were() -> None:
    """A unit says bytes outright (24B); --cpu-memory and --reserve read a bare integer as bytes, as accelerate's
    max_memory does (docs/profile-format.md): the machine below is 80 GiB, and 0 is 0."""
    result = api.plan("oneke", gpus=[f"{80 * GiB}B"], cpu_memory="0", reserve="0")
    (device,) = result.profile.devices
    assert device.total_bytes == 80 * GiB
    assert result.profile.estimate_on(0).reserve_bytes == 0


# -- a reserve that leaves its device nothing --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["--gpu", "24GiB", "--reserve", "30GiB"], ["--reserve 30GiB on GPU 0 exceeds its 24.00 GiB"]),
        (["--gpu", "24GiB", "--reserve", "24GiB"], ["--reserve 24GiB on GPU 0 takes all of its 24.00 GiB"]),
        (["--gpu", "RTX 3090", "--gpu", "12GiB", "--reserve", "1=13GiB"], ["--reserve 1=13GiB on GPU 1", "12.00 GiB"]),
        (["--gpu", "24GiB", "--reserve", "1GiB", "--reserve", "0=25GiB"], ["--reserve 0=25GiB on GPU 0"]),
        (["--gpu", "24GiB", "--cpu-memory", "8GiB", "--reserve", "cpu=9GiB"], ["--reserve cpu=9GiB exceeds", "8GiB"]),
    ],
)
def test_a_reserve_larger_than_its_device_is_refused_before_fitting(
    capsys: pytest.CaptureFixture[str], argv: list[str], needles: list[str]
) -> None:
    line = one_line(capsys, "oneke-plan", ["oneke", *argv], *needles)
    assert "does not fit" not in line and "offload" not in line


def test_an_inventory_cards_reserve_is_checked_too(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "machine.yaml"
    path.write_text("gpus:\n  - {memory: 80GiB}\n  - {memory: 8GiB, reserve: 9GiB}\n", encoding="utf-8")
    one_line(capsys, "oneke-plan", ["oneke", "--inventory", path], f"{path}: gpus[1].reserve", "GPU 1", "8.00 GiB")
    # --reserve for every GPU wins over the file's (docs/profile-format.md): then the file's is not the one refused
    assert plan_cli.main(["oneke", "--inventory", str(path), "--reserve", "1GiB"]) == 0, capsys.readouterr().err


# -- misspelt flags ------------------------------------------------------------------------------------------------
def test_a_misspelt_required_flag_is_named_not_reported_missing(capsys: pytest.CaptureFixture[str]) -> None:
    one_line(capsys, "oneke-run", ["--profle", "p.yaml"], "unknown flag --profle; did you mean --profile?")
    one_line(capsys, "oneke-run", ["--profle=p.yaml", "--input", "i", "--output", "o"], "did you mean --profile?")
    one_line(capsys, "oneke-plan", ["oneke", "--gpus", "24GiB"], "unknown flag --gpus; did you mean --gpu?")
    one_line(capsys, "oneke-score", ["a.jsonl", "--tsk", "NER"], "unknown flag --tsk; did you mean --task?")
    line = one_line(capsys, "oneke-score", ["a.jsonl", "--profle"], "unknown flag --profle")
    assert "did you mean" not in line  # oneke-score has no flag like it
    # after a lone `--`, words are values, as argparse reads them: not flags to correct
    line = one_line(capsys, "oneke-score", ["a.jsonl", "--", "--profle"])
    assert "unknown flag" not in line


def _typos(flag: str) -> list[str]:
    """`flag` with one letter dropped or two neighbours swapped, where that spells no flag's beginning."""
    name = flag[2:]
    dropped = [name[:i] + name[i + 1 :] for i in range(1, len(name) - 1)]
    swapped = [name[:i] + name[i + 1] + name[i] + name[i + 2 :] for i in range(1, len(name) - 1)]
    return [f"--{typo}" for typo in dropped + swapped if typo != name]


@pytest.mark.parametrize("prog", list(COMMANDS))
def test_every_flag_misspelt_is_one_line_that_suggests_it(prog: str, capsys: pytest.CaptureFixture[str]) -> None:
    """For every long flag of every command, each one-letter typo that is no flag's start is refused in one line
    naming the typo, and the suggestion is a flag the command has (for almost all, the one misspelt)."""
    parser = COMMANDS[prog][1]()
    flags = sorted({name for action in parser._actions for name in action.option_strings if name.startswith("--")})
    tried = right = 0
    for flag in flags:
        for typo in _typos(flag):
            if any(other.startswith(typo) for other in flags):
                continue  # argparse takes a flag's beginning for the flag
            line = one_line(capsys, prog, [typo, "x"], f"unknown flag {typo}")
            tried += 1
            if "; did you mean " in line:
                suggested = line.split("; did you mean ")[1].split("?")[0]
                assert suggested in flags, line
                right += suggested == flag
    assert tried > 10
    assert right >= 0.9 * tried, (right, tried)


# -- no note before a refusal --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny model, a second one with other random weights, and a CPU profile for each (8 new tokens)."""
    folder = tmp_path_factory.mktemp("messages")
    other = build_tiny_llama(folder / "other", seed=1)
    (folder / "inventory.yaml").write_text("gpus: []\ncpu_memory: 4GiB\n", encoding="utf-8")
    found = {"model": tiny_model_dir, "other": other}
    for name, model in list(found.items()):
        profile = folder / f"{name}.yaml"
        argv = [str(model), "--inventory", str(folder / "inventory.yaml"), "--max-new-tokens", "8"]
        assert plan_cli.main([*argv, "--dtype", "float32", "-o", str(profile)]) == 0
        found[f"{name}_profile"] = profile
    return found


def _run(tiny: dict[str, Path], model: str, input: Path, output: Path, *extra: str) -> list[str]:
    return ["--profile", str(tiny[f"{model}_profile"]), "--model", str(tiny[model]), "--input", str(input),
            "--output", str(output), "--no-progress", *extra]  # fmt: skip


@pytest.mark.parametrize(("template", "needle"), [("llama3", "<|eot_id|>"), ("qwen", "<|im_start|>"), ("model", "")])
def test_a_template_the_tokenizer_cannot_run_is_refused_alone(
    template: str, needle: str, tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--template overriding the profile's is a note; when the tokenizer then refuses the template, the refusal is
    the only line (the note was printed first, and read as the problem's cause)."""
    texts = tmp_path / "texts.jsonl"
    texts.write_text('{"text": "张三在北京"}\n', encoding="utf-8")
    argv = _run(tiny, "model", texts, tmp_path / "out.jsonl", "--task", "NER", "--schema", SCHEMA)
    one_line(capsys, "oneke-run", [*argv, "--template", template], f"template {template}", needle)
    assert not (tmp_path / "out.jsonl").exists()


def test_a_template_override_that_runs_is_noted_once(
    tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    texts = tmp_path / "texts.jsonl"
    texts.write_text('{"text": "张三在北京"}\n', encoding="utf-8")
    argv = _run(tiny, "model", texts, tmp_path / "out.jsonl", "--task", "NER", "--schema", SCHEMA)
    assert run_cli.main([*argv, "--template", "vanilla"]) == 0
    err = capsys.readouterr().err
    assert err.count("--template vanilla: prompts use it instead of the profile's") == 1, err
    assert err.index("--template vanilla") < err.index("planned weights")  # before the load's table


def test_a_refusal_after_a_plan_note_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """Without --gpu on a machine with no GPU, oneke-plan notes that it plans for the CPU; a bad number found after
    that note is still the one line (on a machine with GPUs there is no note: one line too)."""
    one_line(capsys, "oneke-plan", ["oneke", "--batch-size", "0"], "batch")


def test_an_input_with_no_prompt_says_why_in_its_line(
    tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """EEA skips records without events (as DeepKE does): a file of only those has no prompt, and the line says so
    (it once said 'see the note above', a note dropped with the refusal)."""
    texts = tmp_path / "eea.jsonl"
    texts.write_text('{"text": "a", "event": []}\n{"text": "b", "event": []}\n', encoding="utf-8")
    schema = '[{"event_type": "裁员", "arguments": ["时间"]}]'
    argv = _run(tiny, "model", texts, tmp_path / "out.jsonl", "--task", "EEA", "--schema", schema)
    one_line(capsys, "oneke-run", argv, "no prompt to run", "2 lines", "no events")


# -- oneke-run's input and oneke-score's files -----------------------------------------------------------------
RAW = [
    {"text": "张三和李四在北京", "entity": [{"entity": "张三", "entity_type": "人物"}]},
    {"text": "王五在上海工作", "entity": [{"entity": "上海", "entity_type": "地点"}]},
    {"text": "赵六去了广州", "entity": []},
]


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def test_a_raw_file_without_task_is_told_to_pass_task_and_schema(
    tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = _jsonl(tmp_path / "raw.jsonl", RAW)
    argv = _run(tiny, "model", raw, tmp_path / "out.jsonl")
    one_line(capsys, "oneke-run", argv, f"{raw} looks like a raw DeepKE file", "--task", "--schema")
    one_line(capsys, "oneke-score", [raw], "a raw DeepKE input line", "--task and --schema")
    deepke = Path(__file__).parents[2] / "examples" / "deepke" / "NER" / "test.json"
    one_line(capsys, "oneke-score", [deepke], "an input line", "run oneke-run on it")


@pytest.mark.parametrize("indent", [None, 2])
def test_a_json_array_where_json_lines_are_read_says_so(
    indent: int | None, tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Neither reader accepts a JSON array (DeepKE's files and oneke-run's output are JSON Lines): both say what the
    file is, whether the array is on one line or pretty-printed."""
    array = tmp_path / "raw.json"
    array.write_text(json.dumps(RAW, ensure_ascii=False, indent=indent), encoding="utf-8")
    needles = ["is a JSON array", "one JSON object per line", "jq -c"]
    one_line(capsys, "oneke-run", _run(tiny, "model", array, tmp_path / "o.jsonl", "--task", "NER", "--schema", SCHEMA),
             *needles)  # fmt: skip
    one_line(capsys, "oneke-run", _run(tiny, "model", array, tmp_path / "o.jsonl"), *needles)
    one_line(capsys, "oneke-score", [array], *needles)
    pretty = tmp_path / "one.json"
    pretty.write_text(json.dumps(RAW[0], ensure_ascii=False, indent=2), encoding="utf-8")
    one_line(capsys, "oneke-score", [pretty], "lone '{'", "one JSON object per line")


@pytest.fixture(scope="module")
def outputs(tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """oneke-run's real outputs of the tiny model and of its other-seed twin: on labelled raw lines (3 records, 2
    schema chunks each: 6 prompts), and on the same lines without labels. Random weights answer text, never JSON."""
    folder = tmp_path_factory.mktemp("outputs")
    labelled = _jsonl(folder / "labelled.jsonl", RAW)
    bare = _jsonl(folder / "bare.jsonl", [{"text": row["text"]} for row in RAW])
    made = {}
    for model, (name, input) in itertools.product(("model", "other"), (("labelled", labelled), ("bare", bare))):
        out = made[f"{model}_{name}"] = folder / f"{model}_{name}.jsonl"
        argv = _run(tiny, model, input, out, "--task", "NER", "--schema", SCHEMA, "--chunk-size", "2")
        assert run_cli.main(argv) == 0
    return made


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_an_unlabelled_output_is_recognised(outputs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    bare = outputs["model_bare"]
    one_line(capsys, "oneke-score", [bare], f"no gold labels in {bare}", "oneke-run's output", "labelled")


def test_two_runs_whose_answers_differ_but_never_parse(
    outputs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """Predictions agree (nothing parses, nothing is predicted) where every answer differs: the comparison says
    both, counted here from the files themselves."""
    a, b = outputs["model_labelled"], outputs["other_labelled"]
    lines_a = [line for line in _lines(a) if not line.get("merged")]
    lines_b = [line for line in _lines(b) if not line.get("merged")]
    assert len(lines_a) == len(lines_b) == 6
    differ = sum(x["raw_output"] != y["raw_output"] for x, y in zip(lines_a, lines_b, strict=True))
    neither = sum("parse_error" in x and "parse_error" in y for x, y in zip(lines_a, lines_b, strict=True))
    assert differ > 0 and neither == 6  # what this case is about: random weights never answer JSON
    assert score_cli.main([str(a), str(b), "--format", "json"]) == 0
    summary = json.loads(capsys.readouterr().out)["tasks"]["NER"]
    assert summary["parts"]["entity"]["records_differ"] == 0
    assert summary["answers"]["prompts"] == 6
    assert summary["answers"]["text_differs"] == differ
    assert summary["answers"]["neither_parsed"] == differ
    assert summary["errors"] == {"a": 6, "b": 6} and summary["prompts"] == {"a": 6, "b": 6}
    assert score_cli.main([str(a), str(b)]) == 0
    table = capsys.readouterr().out
    assert f"NER: {differ} of 6 answers differ in their text: {differ} not JSON in either run" in table
    assert score_cli.main([str(a), str(a)]) == 0
    assert "NER: 0 of 6 answers differ in their text\n" in capsys.readouterr().out


def test_answers_written_differently_with_the_same_items(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """DeepKE's inference output (no raw_output): the same entities in another JSON layout are 'the same items
    written differently'; other entities are 'different items'."""
    base = {"id": "r1", "task": "NER", "label": json.dumps([{"entity": "张三", "entity_type": "人物"}])}
    a = _jsonl(tmp_path / "a.jsonl", [{**base, "output": '{"人物": ["张三"]}'}, {**base, "output": '{"人物": []}'}])
    b_lines = [{**base, "output": '{ "人物" : [ "张三" ] }'}, {**base, "output": '{"人物": ["李四"]}'}]
    b = _jsonl(tmp_path / "b.jsonl", b_lines)
    assert score_cli.main([str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "NER: 2 of 2 answers differ in their text: 1 the same items written differently, 1 different items" in out


def test_the_table_keeps_records_apart_from_prompt_line_errors(
    outputs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    path = outputs["model_labelled"]
    assert score_cli.main([str(path)]) == 0
    out = capsys.readouterr().out
    table, _, below = out.partition("\n\n")
    header, row = table.splitlines()
    assert header.split() == ["task", "part", "P", "R", "F1", "tp", "pred", "gold", "records"]
    assert row.split()[-1] == str(len({line["id"] for line in _lines(path)}))  # records: 3 texts
    prompts = [line for line in _lines(path) if not line.get("merged")]
    errors = sum("parse_error" in line or "error" in line for line in prompts)
    assert below.startswith(f"NER: {errors} of {len(prompts)} prompt lines are errors")


# -- the picture -----------------------------------------------------------------------------------------------
FONT_PLACES = ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/TTF", "/usr/share/fonts/dejavu",
               "/usr/local/share/fonts", "/Library/Fonts")  # fmt: skip


class Font:
    """A TrueType font's advance widths per character, ascent and descent, in em (read with struct from its head,
    hhea, hmtx and cmap tables: the font itself, not the picture's estimate)."""

    def __init__(self, path: Path) -> None:
        data = path.read_bytes()
        (count,) = struct.unpack(">H", data[4:6])
        tables = {}
        for i in range(count):
            tag, _, offset, _ = struct.unpack(">4sIII", data[12 + 16 * i : 28 + 16 * i])
            tables[tag.decode()] = offset
        (units,) = struct.unpack(">H", data[tables["head"] + 18 : tables["head"] + 20])
        hhea = tables["hhea"]
        ascent, descent = struct.unpack(">hh", data[hhea + 4 : hhea + 8])
        (metrics,) = struct.unpack(">H", data[hhea + 34 : hhea + 36])
        advances = [struct.unpack(">H", data[tables["hmtx"] + 4 * g : tables["hmtx"] + 4 * g + 2])[0]
                    for g in range(metrics)]  # fmt: skip
        self.ascent, self.descent = ascent / units, -descent / units
        self.widths = {chr(c): advances[min(g, metrics - 1)] / units for c, g in self._cmap(data, tables["cmap"])}

    @staticmethod
    def _cmap(data: bytes, cmap: int) -> list[tuple[int, int]]:
        """(code point, glyph) pairs of the Unicode BMP subtable (format 4)."""
        (count,) = struct.unpack(">H", data[cmap + 2 : cmap + 4])
        for i in range(count):
            platform, encoding, offset = struct.unpack(">HHI", data[cmap + 4 + 8 * i : cmap + 12 + 8 * i])
            table = cmap + offset
            if (platform, encoding) in ((3, 1), (0, 3)) and struct.unpack(">H", data[table : table + 2])[0] == 4:
                break
        else:
            raise AssertionError("no format-4 Unicode cmap")
        (segments,) = struct.unpack(">H", data[table + 6 : table + 8])
        segments //= 2

        def array(start: int, fmt: str = "H") -> list[int]:
            return list(struct.unpack(f">{segments}{fmt}", data[start : start + 2 * segments]))

        ends = array(table + 14)
        starts = array(table + 16 + 2 * segments)
        deltas = array(table + 16 + 4 * segments, "h")
        range_at = table + 16 + 6 * segments
        ranges = array(range_at)
        pairs = []
        for i, (first, last) in enumerate(zip(starts, ends, strict=True)):
            for c in range(first, min(last, 0xFFFE) + 1):
                if ranges[i] == 0:
                    glyph = (c + deltas[i]) & 0xFFFF
                else:
                    at = range_at + 2 * i + ranges[i] + 2 * (c - first)
                    (glyph,) = struct.unpack(">H", data[at : at + 2])
                    glyph = (glyph + deltas[i]) & 0xFFFF if glyph else 0
                if glyph:
                    pairs.append((c, glyph))
        return pairs

    def width(self, text: str, size: float) -> float:
        """As drawn in this font; a character it lacks falls back to another font, taken as 1 em (CJK's width)."""
        return size * sum(self.widths.get(c, 1.0) for c in text)


@pytest.fixture(scope="module")
def dejavu() -> Font:
    for place in FONT_PLACES:
        path = Path(place) / "DejaVuSans.ttf"
        if path.is_file():
            return Font(path)
    pytest.skip("DejaVuSans.ttf is not installed here: the picture's texts cannot be measured")


def test_the_width_estimate_is_never_narrower_than_dejavu_sans(dejavu: Font) -> None:
    """Every character the font draws (about 5,000, ASCII and not)."""
    assert len(dejavu.widths) > 1000
    for c, width in dejavu.widths.items():
        if c.isprintable():
            assert text_width(c, 1) >= width - 1e-9, (c, text_width(c, 1), width)


LONG_NAMES = ["NVIDIA GeForce RTX 4090 Laptop GPU", "Accelerator-without-any-spaces-in-its-very-long-name-012345",
              "国产 加速卡 第二代 旗舰版", '<R&D> "prototype" card', "WWWWWWWWWWWWWWWWWWWW MMMMMMMMMMMMMMM",
              "Ускоритель ‱ Ωmega"]  # fmt: skip


def _text_boxes(root: ET.Element, font: Font) -> list[tuple[str, tuple[float, float, float, float]]]:
    boxes = []
    for text in root.iter(f"{SVG}text"):
        size = float(text.get("font-size") or root.get("font-size") or 16)
        x, y, content = float(text.get("x", 0)), float(text.get("y", 0)), text.text or ""
        boxes.append((content, (x, y - font.ascent * size, x + font.width(content, size), y + font.descent * size)))
    return boxes


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float], gap: float = 0) -> bool:
    """Whether two boxes (x0, y0, x1, y1) overlap, or come closer than `gap` side by side."""
    return a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] and b[1] < a[3]


@pytest.mark.parametrize(("gpus", "replicas"), [(1, 1), (2, 1), (8, 1), (8, 2), (16, 1)])
def test_every_text_of_the_picture_is_inside_it_and_none_overlaps(
    gpus: int, replicas: int, dejavu: Font, tmp_path: Path
) -> None:
    """1 to 16 GPUs with long names (Latin, without spaces, CJK, XML's special characters, the widest letters), and
    a model path of 200 characters: every text's box (DejaVu Sans' advances, ascent and descent) lies inside the
    viewBox, no two texts overlap or run together (4 px apart at least), and no text overlaps a bar, a box or a
    legend swatch."""
    inventory = tmp_path / "machine.yaml"
    cards = [{"name": LONG_NAMES[i % len(LONG_NAMES)], "memory": "80GiB"} for i in range(gpus)]
    inventory.write_text(yaml.safe_dump({"gpus": cards}, allow_unicode=True), encoding="utf-8")
    model = tmp_path / ("a-model-folder-with-a-long-name-" * 7)[:200]
    model.mkdir()
    oneke_config = Path(api.__file__).parents[1] / "data" / "oneke_config.json"
    (model / "config.json").write_text(oneke_config.read_text(encoding="utf-8"), encoding="utf-8")
    picture = tmp_path / "machine.svg"
    api.plan(str(model), inventory_file=inventory, replicas=replicas, plot=picture, cpu_memory=0)
    root = ET.parse(picture).getroot()
    left, top, width, height = map(float, root.get("viewBox", "").split())
    assert (float(root.get("width", 0)), float(root.get("height", 0))) == (width, height)
    boxes = _text_boxes(root, dejavu)
    assert len(boxes) >= 2 + 5 + 3 * gpus  # title, subtitle, legend, and per device its label, name, use
    for content, (x0, y0, x1, y1) in boxes:
        assert left <= x0 and x1 <= left + width and top <= y0 and y1 <= top + height, (content, (x0, y0, x1, y1))
    for (one, a), (other, b) in itertools.combinations(boxes, 2):
        assert not _overlap(a, b, gap=4), (one, other)  # a space's width apart at least: words must not run on
    rects = [(float(r.get("x", 0)), float(r.get("y", 0)), float(r.get("x", 0)) + float(r.get("width", 0)),
              float(r.get("y", 0)) + float(r.get("height", 0))) for r in root.iter(f"{SVG}rect")]  # fmt: skip
    for content, box in boxes:
        assert not any(_overlap(box, rect) for rect in rects), content
    labels = " ".join(content for content, _ in boxes)
    assert all(word in labels for word in ("GPU 0", "used", "of 80.00 GiB", "a-model-folder"))
    assert all(LONG_NAMES[i % len(LONG_NAMES)].split()[0] in labels for i in range(gpus))  # XML-escaped and back
