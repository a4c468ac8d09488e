"""oneke-score: perfect answers to every DeepKE test file, flowed through oneke-run, score 100 for all seven tasks;
hand-made wrong answers (tests/data/score) score exactly what is computed by hand below; two runs compare."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from perfect_answers import perfect_text
from transformers import AutoTokenizer

from oneke_plan.cli.plan import main as plan_main
from oneke_plan.cli.run import main as run_main
from oneke_plan.cli.score import main as score_main
from oneke_plan.core.errors import BadInput
from oneke_plan.extract.batching import Encoded
from oneke_plan.extract.generation import GreedyGenerator
from oneke_plan.extract.score import compare, score_file
from oneke_plan.formats import oneke

TASKS = ("NER", "RE", "EE", "EET", "EEA", "KG", "SPO")
FIXTURES = Path(__file__).parents[1] / "data" / "score"
DEEPKE = Path(__file__).resolve().parents[2] / "examples" / "deepke"


def score_json(capsys: pytest.CaptureFixture[str], *files: Path) -> dict[str, Any]:
    assert score_main([*map(str, files), "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


# -- perfect answers through oneke-run ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def perfect_outputs(
    tiny_model_dir: Path, deepke_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """oneke-run over each DeepKE test.json on the tiny model, its generator answering every prompt perfectly
    (from the line's label): the real prompts, tokenizer, runner, journal and output files."""
    folder = tmp_path_factory.mktemp("perfect")
    (folder / "inventory.yaml").write_text("gpus: []\ncpu_memory: 16GiB\n")
    profile = folder / "cpu.yaml"
    argv = [str(tiny_model_dir), "--inventory", str(folder / "inventory.yaml"), "--max-input-tokens", "600"]
    assert (
        plan_main([*argv, "--max-new-tokens", "4", "--batch-size", "8", "--dtype", "float32", "-o", str(profile)]) == 0
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    answers: dict[str, str] = {}
    for task in TASKS:
        for line in (deepke_dir / task / "test.json").read_text(encoding="utf-8").splitlines():
            given = json.loads(line)
            answers[given["instruction"]] = perfect_text(task, given["instruction"], given["label"])

    def run(self: GreedyGenerator, prompts: Sequence[Encoded], batch_size: int) -> Iterator[tuple[int, list[int]]]:
        for item in prompts:
            prompt = tokenizer.decode(item.ids, skip_special_tokens=True)
            instruction = re.search(r"<</SYS>>\n\n(.*) \[/INST\]$", prompt, re.S).group(1)  # type: ignore[union-attr]
            yield item.index, tokenizer.encode(answers[instruction], add_special_tokens=False)

    outputs = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(GreedyGenerator, "run", run)
        for task in TASKS:
            outputs[task] = folder / f"{task}.jsonl"
            argv = ["--profile", str(profile), "--input", str(deepke_dir / task / "test.json"), "--no-progress"]
            assert run_main([*argv, "--output", str(outputs[task])]) == 0
    return outputs


@pytest.mark.parametrize("task", TASKS)
def test_perfect_answers_score_100(task: str, perfect_outputs: dict[str, Path], capsys) -> None:  # type: ignore[no-untyped-def]
    lines = [json.loads(x) for x in perfect_outputs[task].read_text(encoding="utf-8").splitlines()]
    assert all("parsed" in line for line in lines)  # every answer round-tripped through the tokenizer and parser
    summary = score_json(capsys, perfect_outputs[task])["tasks"]
    assert list(summary) == [task]
    assert summary[task]["errors"] == 0 and summary[task]["records"] == 6 - (task in ("KG", "SPO"))
    for part, s in summary[task]["parts"].items():
        assert s["gold"] > 0 and (s["precision"], s["recall"], s["f1"]) == (100.0, 100.0, 100.0), (part, s)
    if task in ("RE", "SPO"):  # OneKE's subject/object became the head/tail DeepKE's evaluator reads
        prompts = [line for line in lines if not line.get("merged")]
        assert any('"subject"' in line["raw_output"] for line in prompts)
        assert not any('"subject"' in line["output"] for line in prompts)


def test_merged_lines_add_no_prediction(perfect_outputs: dict[str, Path]) -> None:
    """DeepKE's evaluator reads every line's `output`; a merged line's is "{}", the answer is in `parsed`."""
    for path in perfect_outputs.values():
        for line in (json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()):
            if line.get("merged"):
                assert line["output"] == "{}" and isinstance(line["parsed"], dict) and len(line["chunks"]) > 1


# -- hand-made wrong answers ---------------------------------------------------------------------------------------
# Each expected tuple: (tp, pred, gold) per part, then P, R, F1 (percent, 2 decimals), counted by hand from the
# fixture lines. For NER, RE, EE and EEA's argument part these equal what DeepKE's eval_func.py prints on the same
# files (bench/authors_evaluator.py; docs/scoring.md), except that their F1 is computed from P and R rounded first.
HAND = {
    # r1: (张三,人物) (王五,人物) (北京,地点) vs 张三 北京 李四: 2 right of 3; r2: not JSON (1 error, gold 0);
    # r3: 上海 twice, gold once: 1 right of 2. tp 3, pred 5, gold 4: P 60, R 75, F1 6/9.
    "NER": ({"entity": (3, 5, 4, 60.0, 75.0, 66.67)}, 1),
    # r1: (喜剧之王,主演,周星驰) right, (B,导演,A) reversed; r2: (X,目,Y) right, its other chunk an error line.
    "RE": ({"triple": (2, 3, 3, 66.67, 66.67, 66.67)}, 1),
    # events: (裁员,裁员) right, (加盟,加盟) vs gold trigger 加入. arguments: r1 900余人 right, 时间 NAN skipped,
    # 甲 and 乙 as 裁员方 wrong; r2 张三 right: tp 2, pred 4, gold 3: P 50, R 66.67, F1 4/7.
    "EE": ({"event": (1, 2, 2, 50.0, 50.0, 50.0), "argument": (2, 4, 3, 50.0, 66.67, 57.14)}, 0),
    # arguments: r1 both right (裁员方 NAN skipped), r2 李四 wrong, 乙 right; events: both triggers right.
    "EEA": ({"event": (2, 2, 2, 100.0, 100.0, 100.0), "argument": (3, 4, 4, 75.0, 75.0, 75.0)}, 0),
    # (裁员,裁员) right, (加盟,加盟) vs gold 加入.
    "EET": ({"event": (1, 2, 2, 50.0, 50.0, 50.0)}, 0),
    # 别名 睦仁, 父母 孝明天皇, 配偶 英照皇太后 right; 职业 天皇 wrong; 无 and NaN skipped; gold 父母 英照皇太后 missed.
    "KG": ({"triple": (3, 4, 4, 75.0, 75.0, 75.0)}, 0),
    # (邪少兵王,作者,冰火未央) right, (x,作曲,y) wrong: P 50, R 100, F1 2/3.
    "SPO": ({"triple": (1, 2, 1, 50.0, 100.0, 66.67)}, 0),
}


@pytest.mark.parametrize("task", TASKS)
def test_hand_made_answers_score_what_was_counted_by_hand(task: str) -> None:
    parts, errors = HAND[task]
    (score,) = score_file(FIXTURES / f"{task}.jsonl").values()
    assert score.task == task and score.errors == errors
    summary = score.summary()["parts"]
    for part, (tp, pred, gold, p, r, f1) in parts.items():
        assert summary[part] == {"tp": tp, "pred": pred, "gold": gold, "precision": p, "recall": r, "f1": f1}


def test_re_answers_with_subject_and_object_are_read_too(tmp_path: Path) -> None:
    """Output files of other tools may keep OneKE's subject/object; DeepKE's evaluator would read ('', r, '')."""
    lines = (FIXTURES / "RE.jsonl").read_text(encoding="utf-8").replace('"head', '"subject').replace('"tail', '"object')
    (tmp_path / "re.jsonl").write_text(lines.replace('\\"subject', '\\"head').replace('\\"object', '\\"tail'), "utf-8")
    (score,) = score_file(tmp_path / "re.jsonl").values()
    assert score.counts()["triple"].tp == 2


def test_undefined_scores_are_none_not_zero(tmp_path: Path) -> None:
    line = json.loads((FIXTURES / "NER.jsonl").read_text(encoding="utf-8").splitlines()[2])  # gold [], not JSON
    (tmp_path / "a.jsonl").write_text(json.dumps(line, ensure_ascii=False) + "\n", "utf-8")
    (score,) = score_file(tmp_path / "a.jsonl").values()
    assert score.summary()["parts"]["entity"] == {
        "tp": 0, "pred": 0, "gold": 0, "precision": None, "recall": None, "f1": None
    }  # fmt: skip


# -- two runs side by side -------------------------------------------------------------------------------------------
def test_compare_two_runs_of_one_input(perfect_outputs: dict[str, Path], tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """B = A with one NER record's entity dropped: F1 falls by what the counts say, one record differs."""
    a = perfect_outputs["NER"]
    lines = [json.loads(x) for x in a.read_text(encoding="utf-8").splitlines()]
    changed = next(n for n, line in enumerate(lines) if any(line["parsed"].values()))
    key = next(k for k, v in lines[changed]["parsed"].items() if v)
    lines[changed]["output"] = json.dumps({**lines[changed]["parsed"], key: lines[changed]["parsed"][key][1:]})
    b = tmp_path / "b.jsonl"
    b.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")

    # gold by hand from the authors' file: the (entity, type) pairs of each record's label, 3 in all
    authors = [json.loads(x) for x in (DEEPKE / "NER" / "test.json").read_text(encoding="utf-8").splitlines()]
    gold = sum(len({(e["entity"], e["entity_type"]) for e in json.loads(line["label"])}) for line in authors)
    assert gold == 3
    summary = score_json(capsys, a, b)
    entity = summary["tasks"]["NER"]["parts"]["entity"]
    assert entity["a"]["f1"] == 100.0 and entity["records_differ"] == 1
    assert (entity["a"]["tp"], entity["a"]["gold"]) == (gold, gold)
    assert (entity["b"]["tp"], entity["b"]["pred"], entity["b"]["gold"]) == (2, 2, 3)
    assert entity["b"]["f1"] == 80.0  # P 2/2, R 2/3: F1 = 2 x 2 / (2 + 3)
    assert entity["f1_change"] == round(entity["b"]["f1"] - 100.0, 2)
    assert score_main([str(a), str(b)]) == 0
    table = capsys.readouterr().out
    assert f"A = {a}" in table and "F1 A" in table and "differ" in table


def test_compare_refuses_runs_of_different_inputs(perfect_outputs: dict[str, Path], capsys) -> None:  # type: ignore[no-untyped-def]
    assert score_main([str(perfect_outputs["NER"]), str(perfect_outputs["RE"])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "compare runs of the same input" in err[0]
    ner = score_file(perfect_outputs["NER"])
    fewer = {"NER": ner["NER"]}
    fewer_records = dict(list(ner["NER"].records.items())[1:])
    fewer["NER"] = type(ner["NER"])("NER", fewer_records)
    with pytest.raises(BadInput, match="in only one of"):
        compare(ner, fewer, "a", "b")


# -- bad input -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("content", "extra", "needle"),
    [
        ("{oops\n", [], "line 1: not JSON"),
        ('{"id": "a", "output": "{}", "task": "NER"}\n', [], "no gold labels in"),
        ('{"id": "a", "label": "[]", "task": "NER"}\n', [], "no 'output' field"),
        ('{"id": "a", "label": "oops", "output": "{}", "task": "NER"}\n', [], "'label' must be a JSON string"),
        ('{"id": "a", "label": "[{\\"x\\": 1}]", "output": "{}", "task": "NER"}\n', [], "lacks 'entity'"),
        ('{"id": "a", "label": "[]", "output": "{}"}\n', [], "cannot tell the task"),
        ('{"id": "a", "label": "[]", "output": "{}", "task": "POS"}\n', [], "unknown task 'POS'"),
        ('{"id": "a", "label": "[]", "output": "{}"}\n', ["--task", "pos"], "unknown task 'POS'"),
        ("\n", [], "no answer lines"),
    ],
)
def test_bad_files_are_one_line_and_exit_2(
    content: str, extra: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text(content, encoding="utf-8")
    assert score_main([str(path), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("oneke-score: error:") and needle in err[0], err


def test_task_flag_and_instruction_detection(tmp_path: Path) -> None:
    line = json.loads((FIXTURES / "NER.jsonl").read_text(encoding="utf-8").splitlines()[0])
    del line["task"]  # the instruction text says NER
    (tmp_path / "a.jsonl").write_text(json.dumps(line, ensure_ascii=False) + "\n", "utf-8")
    assert list(score_file(tmp_path / "a.jsonl")) == ["NER"]
    with pytest.raises(BadInput, match="EET gold label lacks 'event_trigger'"):  # --task wins over the line
        score_file(tmp_path / "a.jsonl", "eet")
    assert oneke.detect_task(json.loads(line["instruction"])["instruction"]) == ("NER", "zh")
