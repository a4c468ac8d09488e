"""oneke-score: precision, recall and F1 of an answer file per task, or of two runs of one input side by side."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from oneke_plan import __version__
from oneke_plan.cli.common import OneLineParser, format_table, run_main, wants_debug

EPILOG = """\
examples:
  oneke-score ner.out.jsonl                     # P/R/F1 per task, against each line's label
  oneke-score bf16.jsonl 4bit.jsonl             # two plans on one input: the accuracy cost of the cheaper one
  oneke-score out.jsonl --format json > s.json  # machine-readable

Scores follow DeepKE's evaluator (eval_func.py) where it has a working rule; docs/scoring.md lists every rule.
exit codes: 0 done, 2 bad input (a file that cannot be scored, or two files of different inputs).
"""


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="oneke-score",
        description="Score OneKE answers (oneke-run's output, or DeepKE inference output with id, label and output) "
        "against their gold labels: precision, recall and F1 per task; with two files, both side by side.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("answers", type=Path, metavar="A.jsonl", help="an answer file")
    p.add_argument("other", type=Path, nargs="?", metavar="B.jsonl", help="a second run of the same input to compare")
    p.add_argument("--task", help="score every line as this task (default: each line's task field or instruction)")
    p.add_argument("--format", choices=["table", "json"], default="table", help="output (default: %(default)s)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--version", action="version", version=f"oneke-score {__version__}")
    return p


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def score_table(summary: dict[str, Any]) -> str:
    """P/R/F1 per task and part over the records; then, apart (they count prompt lines, not records), each task's
    prompt lines whose answer is not a JSON object."""
    rows = []
    for task, score in summary["tasks"].items():
        for part, s in score["parts"].items():
            rows.append(
                [task, part, _cell(s["precision"]), _cell(s["recall"]), _cell(s["f1"]), str(s["tp"]), str(s["pred"]),
                 str(s["gold"]), str(score["records"])]
            )  # fmt: skip
    header = ["task", "part", "P", "R", "F1", "tp", "pred", "gold", "records"]
    lines = [format_table(header, rows, right=range(2, 9)), ""]
    for task, score in summary["tasks"].items():
        lines.append(f"{task}: {error_text(score['errors'], score['prompts'], score['unanswered'])}")
        if score["windows"]:
            lines.append(
                f"{task}: {score['failed_windows']} of the {score['windows']} windows of split prompts gave no answer "
                "or one that is not JSON (their prompts' merged answers leave them out)"
            )
    return "\n".join(lines)


def error_text(errors: int, prompts: int, unanswered: int) -> str:
    """'2 of 6 prompt lines are errors (...)': the answers DeepKE's evaluator counts as errors."""
    got_none = f"; {unanswered} got no answer ('error' lines)" if unanswered else ""
    why = f"the answer is not a JSON object, so it predicts nothing{got_none}"
    return f"{errors} of {prompts} prompt lines are errors ({why})"


def compare_table(summary: dict[str, Any]) -> str:
    """Both runs' F1, P and R per task and part, and the records whose items differ; then, per task, how the prompt
    lines' answers differ (texts can differ where items do not) and each run's errors."""
    rows = []
    for task, score in summary["tasks"].items():
        for part, s in score["parts"].items():
            a, b = s["a"], s["b"]
            change = "-" if s["f1_change"] is None else f"{s['f1_change']:+.2f}"
            rows.append(
                [task, part, _cell(a["f1"]), _cell(b["f1"]), change, _cell(a["precision"]), _cell(b["precision"]),
                 _cell(a["recall"]), _cell(b["recall"]), str(score["records"]), str(s["records_differ"])]
            )  # fmt: skip
    header = ["task", "part", "F1 A", "F1 B", "B-A", "P A", "P B", "R A", "R B", "records", "items differ"]
    legend = f"A = {summary['a']}\nB = {summary['b']}\n"
    lines = [legend + format_table(header, rows, right=range(2, 11)), ""]
    for task, score in summary["tasks"].items():
        lines.append(f"{task}: {answers_text(score['answers'])}")
        for run in ("a", "b"):
            errors, prompts, unanswered = (score[key][run] for key in ("errors", "prompts", "unanswered"))
            lines.append(f"  {run.upper()}: {error_text(errors, prompts, unanswered)}")
    return "\n".join(lines)


def answers_text(answers: dict[str, int]) -> str:
    """How two runs' answers differ, prompt line by prompt line."""
    text = f"{answers['text_differs']} of {answers['prompts']} answers differ in their text"
    kinds = [
        (answers["neither_parsed"], "not JSON in either run (so neither predicts anything)"),
        (answers["one_parsed"], "JSON in one run only"),
        (answers["same_items"], "the same items written differently"),
        (answers["items_differ"], "different items"),
    ]
    shown = [f"{n} {what}" for n, what in kinds if n]
    return text + (f": {', '.join(shown)}" if shown else "")


def run(args: argparse.Namespace) -> int:
    from oneke_plan.extract.score import compare, score_file

    scores = score_file(args.answers, args.task)
    if args.other is None:
        summary: dict[str, Any] = {
            "file": str(args.answers),
            "tasks": {task: score.summary() for task, score in scores.items()},
        }
        text = score_table(summary)
    else:
        summary = compare(scores, score_file(args.other, args.task), str(args.answers), str(args.other))
        text = compare_table(summary)
    if args.format == "json":
        text = json.dumps(summary, ensure_ascii=False, indent=2)
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_main("oneke-score", lambda: run(args), args.debug or wants_debug(argv), owns_process=argv is None)


if __name__ == "__main__":
    sys.exit(main())
