"""One options type per command: a flag is declared once, as a PlanOptions or RunOptions field, and both the CLI's
parser and the Python API follow from it.

- every field with a flag, given a value that is not its default on the command line, reaches the options object
  converted as its type says (an int read as one, a path as a Path, a repeated flag as a list, a switch flipped),
  and its help text and default are the ones --help shows;
- parsing no flags gives the API's defaults: the CLI and the API cannot disagree;
- api.plan takes every PlanOptions field as a keyword argument (the plan equals the one from the options object),
  api.run every RunOptions field, and a misspelt keyword is a TypeError naming it, as before;
- a field added to an options type is a flag with no other change: its parser, its --help line, its keyword.
"""

from __future__ import annotations

import argparse
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import pytest

from oneke_plan import api
from oneke_plan.api.options import FLAG, WORKLOAD, Flag, PlanOptions, RunOptions, flag, with_keywords
from oneke_plan.cli import plan as plan_cli
from oneke_plan.cli import run as run_cli
from oneke_plan.cli.common import OneLineParser, add_options, options_from
from oneke_plan.core.errors import BadInput

RUN_FILES = ["--profile", "P.yaml", "--input", "in.jsonl", "--output", "out.jsonl"]
"""The flags every oneke-run command line names."""

COMMANDS = [
    pytest.param(plan_cli.build_parser, PlanOptions, [], id="oneke-plan"),
    pytest.param(run_cli.build_parser, RunOptions, RUN_FILES, id="oneke-run"),
]


def flagged(options_type: type) -> list[tuple[Any, Flag, Any]]:
    """Each field that declares a flag, with its Flag and its type."""
    hints = typing.get_type_hints(options_type)
    return [(item, item.metadata[FLAG], hints[item.name]) for item in fields(options_type) if FLAG in item.metadata]


def is_int(hint: Any) -> bool:
    return hint is int or set(typing.get_args(hint)) == {int, type(None)}


def action_for(parser: argparse.ArgumentParser, name: str) -> argparse.Action:
    (action,) = [a for a in parser._actions if a.dest == name]
    return action


def other_value(item: Any, spec: Flag, hint: Any, action: argparse.Action) -> tuple[list[str], Any]:
    """Command-line words that give the field a value other than its default, and the value the options should
    then hold: stated here from the field's declaration, not read from the generated parser."""
    if hint is bool:
        return [action.option_strings[0]], not item.default
    if spec.choices is not None:
        word = [c for c in spec.choices if c != item.default][-1]
    else:
        word = "7" if is_int(hint) else "some/where.txt"
    value = int(word) if is_int(hint) else spec.parse(word) if spec.parse is not None else word
    if spec.positional:
        return [word], value
    flag_words = [action.option_strings[-1], word]
    return (flag_words * 2, [value, value]) if spec.repeat else (flag_words, value)


@pytest.mark.parametrize(("build_parser", "options_type", "required"), COMMANDS)
def test_every_field_is_a_flag_with_its_type_help_and_default(
    build_parser: Callable[[], argparse.ArgumentParser], options_type: type, required: list[str]
) -> None:
    parser = build_parser()
    help_text = "".join(parser.format_help().split())  # argparse wraps lines, at hyphens too
    for item, spec, hint in flagged(options_type):
        action = action_for(parser, item.name)
        assert action.help == spec.help, item.name
        assert "".join((spec.help % {"default": action.default}).split()) in help_text, item.name
        assert action.default == (None if item.default is MISSING else item.default), item.name
        assert action.required == (item.default is MISSING and not spec.positional), item.name
        words, value = other_value(item, spec, hint, action)
        rest = list(required)
        if item.default is MISSING:  # a required one: the sample value instead of the usual one
            at = rest.index(action.option_strings[0])
            rest = rest[:at] + rest[at + 2 :]
        parsed = options_from(parser.parse_args(rest + words), options_type)
        assert getattr(parsed, item.name) == value, item.name
        assert type(getattr(parsed, item.name)) is type(value), item.name


def test_only_progress_is_not_a_flag() -> None:
    """RunOptions.progress is the API's (off); oneke-run turns it on unless --no-progress (RunCommand)."""
    assert [f.name for f in fields(PlanOptions) if FLAG not in f.metadata] == []
    assert [f.name for f in fields(RunOptions) if FLAG not in f.metadata] == ["progress"]
    parser = run_cli.build_parser()
    assert options_from(parser.parse_args(RUN_FILES), run_cli.RunCommand).no_progress is False
    assert options_from(parser.parse_args([*RUN_FILES, "--no-progress"]), run_cli.RunCommand).no_progress is True


def test_no_flags_give_the_api_defaults() -> None:
    """The defaults are the fields': the parser starts from them, so what oneke-plan plans with no flags is what
    api.plan plans with no keyword arguments."""
    assert options_from(plan_cli.build_parser().parse_args([]), PlanOptions) == PlanOptions()
    parsed = options_from(run_cli.build_parser().parse_args(RUN_FILES), RunOptions)
    assert parsed == RunOptions(profile=Path("P.yaml"), input=Path("in.jsonl"), output=Path("out.jsonl"))


def test_api_plan_takes_every_field_as_a_keyword() -> None:
    """Every PlanOptions field as a keyword argument (the non-defaults that make a plan for a described machine,
    the rest at their defaults) plans what the same options object plans, and a positional model overrides it."""
    chosen = {"gpus": ["24GiB", "12GiB"], "cpu_memory": 0, "batch_size": 2, "double_quant": False}
    every = {f.name: chosen.get(f.name, f.default) for f in fields(PlanOptions) if f.name != "model"}
    by_keywords = api.plan("oneke", **every)
    by_options = api.plan(options=PlanOptions(model="oneke", **chosen))
    overridden = api.plan("oneke", options=PlanOptions(model="elsewhere", **chosen))
    assert by_keywords.profile.to_yaml() == by_options.profile.to_yaml() == overridden.profile.to_yaml()
    assert by_keywords.profile.workload.batch_size == 2


def test_api_run_takes_every_field_as_a_keyword(tmp_path: Path) -> None:
    """Every RunOptions field is a keyword api.run accepts: with all of them, the first check to refuse is the
    missing profile file's, not a TypeError."""
    every = {f.name: f.default for f in fields(RunOptions) if f.default is not MISSING}
    missing = tmp_path / "missing.yaml"
    with pytest.raises(BadInput, match="missing.yaml"):
        api.run(missing, tmp_path / "in.jsonl", tmp_path / "out.jsonl", **every)
    with pytest.raises(BadInput, match="missing.yaml"):
        api.run(options=RunOptions(profile=missing, input=tmp_path / "in.jsonl", output=tmp_path / "out.jsonl"))


def test_a_misspelt_keyword_is_a_type_error_naming_it() -> None:
    with pytest.raises(TypeError, match=r"^plan\(\) got an unexpected keyword argument 'bach_size' \(did you mean "):
        api.plan("oneke", gpus=["24GiB"], bach_size=2)
    with pytest.raises(TypeError, match=r"^run\(\) got an unexpected keyword argument 'forse' \(did you mean 'force'"):
        api.run("P.yaml", "in.jsonl", "out.jsonl", forse=True)
    with pytest.raises(TypeError, match="profile"):
        api.run(input="in.jsonl", output="out.jsonl")  # a run names its profile


@dataclass(frozen=True, kw_only=True)
class WithSeed(PlanOptions):
    """PlanOptions and one field more: what adding a flag to oneke-plan is."""

    seed: int = field(default=7, metadata=flag("a new flag (default: %(default)s)", metavar="N", group=WORKLOAD))


def test_a_new_flag_is_one_field() -> None:
    parser = OneLineParser(prog="oneke-plan")
    add_options(parser, WithSeed, plan_cli.PlanCommand)
    workload = next(g for g in parser._action_groups if g.title == WORKLOAD)
    assert "--seed" in [s for a in workload._group_actions for s in a.option_strings]
    assert "--seed N a new flag (default: 7)" in " ".join(parser.format_help().split())
    assert options_from(parser.parse_args(["oneke", "--seed", "3"]), WithSeed) == WithSeed(model="oneke", seed=3)
    assert options_from(parser.parse_args([]), WithSeed) == WithSeed()
    assert with_keywords(WithSeed, None, {"seed": 5}, "plan").seed == 5


def test_a_repeatable_option_takes_one_value_or_a_list() -> None:
    """As the options say: `gpus="80GiB"` is the one GPU ["80GiB"], not five GPUs of one character each."""
    one, listed = api.plan("oneke", gpus="80GiB", cpu_memory=0), api.plan("oneke", gpus=["80GiB"], cpu_memory=0)
    assert one.profile.to_yaml() == listed.profile.to_yaml()
    assert [d.id for d in one.profile.devices] == [0]
