"""DeepKE's own evaluator next to oneke-score on the same answer files: a measurement, not a test (the evaluator is
not on PyPI: deepke 2.2.7 there predates InstructKGC's ie2instruction).

Run:
  python bench/authors_evaluator.py --ie2instruction DIR tests/data/score/*.jsonl
  python bench/authors_evaluator.py --ie2instruction DIR --perfect OUT_DIR
DIR is `example/llm/InstructKGC/ie2instruction` of a DeepKE checkout; its code is imported from there, never copied.
Their metric module imports rouge_chinese and jieba at the top; F1 does not use them, so empty stand-ins are
registered where they are not installed.
--perfect writes, for every examples/deepke/*/test.json, the answers tests/perfect_answers.py builds from the labels
(OneKE's shapes: RE/SPO with subject/object) through oneke-run's output path (RunOutput and its writer: only the
model is left out), then scores those files.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import types
from pathlib import Path
from typing import Any

from common import table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from oneke_plan.extract.answer_lines import answer_line  # noqa: E402
from oneke_plan.extract.inputs import read_converted  # noqa: E402
from oneke_plan.extract.outputs import RunOutput  # noqa: E402
from oneke_plan.extract.score import score_file  # noqa: E402
from oneke_plan.formats import answers  # noqa: E402

TASKS = ("NER", "RE", "EE", "EET", "EEA", "KG", "SPO")
THEIR_KEYS = {"event": "event_", "argument": "argument_", "entity": "", "triple": ""}


def load_their_evaluate(ie2instruction: Path) -> Any:
    for name in ("rouge_chinese", "jieba"):
        try:
            __import__(name)
        except ImportError:
            stub = types.ModuleType(name)
            stub.Rouge = object  # type: ignore[attr-defined]
            sys.modules[name] = stub
    sys.path.insert(0, str(ie2instruction))
    from eval_func import evaluate  # type: ignore[import-not-found]

    return evaluate


def theirs(evaluate: Any, path: Path, task: str) -> dict[str, Any] | str:
    with tempfile.TemporaryDirectory() as folder:
        options = argparse.Namespace(
            path1=str(path), task=task, sort_by="", match_mode="normal", metrics_list="f1",
            out_path=str(Path(folder) / "result.json"),
        )  # fmt: skip
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                evaluate(options)
        except Exception as exc:  # noqa: BLE001 - their evaluator's own failures are the measurement
            return f"cannot score: {type(exc).__name__}: {exc}"
        return json.loads((Path(folder) / "result.json").read_text(encoding="utf-8"))["total"]


def write_perfect(out_dir: Path) -> list[Path]:
    from perfect_answers import perfect_text

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for task in TASKS:
        source = ROOT / "examples" / "deepke" / task / "test.json"
        out = out_dir / f"{task}.jsonl"
        records = read_converted(source)
        with RunOutput(out, source, "overwrite") as output:
            pending = output.start(records)
            assert output.writer is not None
            for record in pending:
                text = perfect_text(task, record.instruction, record.extra["label"])
                output.writer.write_line(answer_line(record, text, *answers.parse_output(task, text)))
            output.finish(records)
        written.append(out)
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ie2instruction", type=Path, required=True)
    parser.add_argument("--perfect", type=Path, metavar="OUT_DIR")
    parser.add_argument("files", type=Path, nargs="*")
    args = parser.parse_args()
    evaluate = load_their_evaluate(args.ie2instruction)
    files = list(args.files) + (write_perfect(args.perfect) if args.perfect else [])
    rows = []
    for path in files:
        for task, score in score_file(path).items():
            result = theirs(evaluate, path, task)
            for part, counts in score.counts().items():
                mine = f"{counts.precision} / {counts.recall} / {counts.f1}"
                if isinstance(result, str):
                    rows.append([f"{path.parent.name}/{path.name}", task, part, result[:60], mine])  # fmt: skip
                    continue
                prefix = THEIR_KEYS[part]
                keys = [f"{prefix}P", f"{prefix}R", f"{prefix}F1"]
                their = " / ".join(str(result.get(k, "-")) for k in keys) if keys[0] in result else "no such part"
                name = f"{path.parent.name}/{path.name}"
                rows.append(
                    [name, task, part, f"{their} (errors {result.get('错误数')})", f"{mine} (errors {score.errors})"]
                )
    print(table(["file", "task", "part", "DeepKE eval_func.py P / R / F1", "oneke-score P / R / F1"], rows, right=()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
