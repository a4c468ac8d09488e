"""OneKE's prompt format and schema chunking, as the model's authors define them (answers: answers.py).

Everything the model was trained on is copied here verbatim, not paraphrased, because OneKE answers well only
to the exact texts it saw in training. Sources (see /work/shared/oneke/README.md, "Prompt format",
"Instruction texts", "Schema shapes", "Output shapes"):

- DeepKE `example/llm/InstructKGC/ie2instruction/convert/utils/instruction.py` (instruction texts),
  `convert_func.py` (test conversion: `multischema_split_by_num_test`, `multischema_construct_instruction`)
  and `convert/processer/processer.py` (`read_from_file`: the 3-line schema.json form);
- DeepKE's OneKE README (chunk sizes `split_num_mapper`, schema shapes, the few-shot `example` form);
- DeepKE's `llama2_zh` chat template (system prompt and `[INST]` wrapper);
- the DeepKE sample data in examples/deepke (an older SPO instruction text, recognised in converted files);
- DeepKE's `processer/*.py` (which gold labels the converter de-duplicates) and `eval/extracter/*.py` (the
  answer fields its evaluator reads: RE items' `head`/`tail`).

This module imports only the standard library and oneke_plan.io.jsonfile (the bounded JSON reader, itself standard
library only), so the prompt format can be tested without torch.
"""

from __future__ import annotations

import json
from typing import Any, TypeAlias

from oneke_plan.formats.templates import ONEKE_SYSTEM
from oneke_plan.io import jsonfile
from oneke_plan.io.limits import MAX_JSON_BYTES

TASKS: tuple[str, ...] = ("NER", "RE", "EE", "EET", "EEA", "KG", "SPO")
LANGS: tuple[str, ...] = ("zh", "en")

SYSTEM_PROMPT = ONEKE_SYSTEM
"""The `default_system` of DeepKE's `llama2_zh` template, which OneKE was fine-tuned with."""

INSTRUCTIONS: dict[str, dict[str, str]] = {
    "NER": {
        "zh": (
            "你是专门进行实体抽取的专家。请从input中抽取出符合schema定义的实体，不存在的实体类型返回空列表。"
            "请按照JSON字符串的格式回答。"
        ),
        "en": (
            "You are an expert in named entity recognition. Please extract entities that match the schema "
            "definition from the input. Return an empty list if the entity type does not exist. Please "
            "respond in the format of a JSON string."
        ),
    },
    "RE": {
        "zh": (
            "你是专门进行关系抽取的专家。请从input中抽取出符合schema定义的关系三元组，"
            "不存在的关系返回空列表。请按照JSON字符串的格式回答。"
        ),
        "en": (
            "You are an expert in relationship extraction. Please extract relationship triples that match "
            "the schema definition from the input. Return an empty list for relationships that do not "
            "exist. Please respond in the format of a JSON string."
        ),
    },
    "EE": {
        "zh": (
            "你是专门进行事件提取的专家。请从input中抽取出符合schema定义的事件，不存在的事件返回空列表，"
            "不存在的论元返回NAN，如果论元存在多值请返回列表。请按照JSON字符串的格式回答。"
        ),
        "en": (
            "You are an expert in event extraction. Please extract events from the input that conform to "
            "the schema definition. Return an empty list for events that do not exist, and return NAN for "
            "arguments that do not exist. If an argument has multiple values, please return a list. Respond "
            "in the format of a JSON string."
        ),
    },
    "EET": {
        "zh": (
            "你是专门进行事件提取的专家。请从input中抽取出符合schema定义的事件类型及事件触发词，"
            "不存在的事件返回空列表。请按照JSON字符串的格式回答。"
        ),
        "en": (
            "You are an expert in event extraction. Please extract event types and event trigger words from "
            "the input that conform to the schema definition. Return an empty list for non-existent events. "
            "Please respond in the format of a JSON string."
        ),
    },
    "EEA": {
        "zh": (
            "你是专门进行事件论元提取的专家。请从input中抽取出符合schema定义的事件论元及论元角色，"
            "不存在的论元返回NAN或空字典，如果论元存在多值请返回列表。请按照JSON字符串的格式回答。"
        ),
        "en": (
            "You are an expert in event argument extraction. Please extract event arguments and their roles "
            "from the input that conform to the schema definition, which already includes event trigger "
            "words. If an argument does not exist, return NAN or an empty dictionary. Please respond in the "
            "format of a JSON string."
        ),
    },
    "KG": {
        "zh": (
            "你是一个图谱实体知识结构化专家。根据输入实体类型(entity type)的schema描述，"
            "从文本中抽取出相应的实体实例和其属性信息，不存在的属性不输出, 属性存在多值就返回列表，"
            "并输出为可解析的json格式。"
        ),
        "en": (
            "You are an expert in structured knowledge systems for graph entities. Based on the schema "
            "description of the input entity type, you extract the corresponding entity instances and their "
            "attribute information from the text. Attributes that do not exist should not be output. If an "
            "attribute has multiple values, a list should be returned. The results should be output in a "
            "parsable JSON format."
        ),
    },
}
"""Instruction texts per task and language, verbatim, as the authors' current converter writes them
(DeepKE `ie2instruction/convert/utils/instruction.py`); used for every prompt this tool builds."""
# The authors' current converter asks SPO with RE's texts (instruction.py maps SPO+zh and SPO+en to them).
INSTRUCTIONS["SPO"] = INSTRUCTIONS["RE"]

LEGACY_INSTRUCTIONS: dict[str, dict[str, str]] = {
    "SPO": {
        "zh": (
            "你是专门进行SPO三元组抽取的专家。请从input中抽取出符合schema定义的spo关系三元组，"
            "不存在的关系返回空列表。请按照JSON字符串的格式回答。"
        ),
    },
}
"""Older texts still found in the authors' published files (SPO/test.json was written before SPO was given RE's
text): recognised in converted input, never used to build a prompt."""

EXAMPLE_SUFFIX: dict[str, str] = {"zh": "你可以参考example进行抽取。"}
"""Appended to the instruction when few-shot `example` items are given. The authors publish only the
Chinese suffix (DeepKE OneKE README, "定制化example示例指令"); there is no English one to copy, so none is
invented."""

CHUNK_SIZES: dict[str, int] = {"NER": 6, "RE": 4, "EE": 4, "EET": 4, "EEA": 4, "KG": 1, "SPO": 4}
"""The authors' `split_num_mapper` (README "Schema shapes"). SPO is not in it; 4 is what DeepKE's
SPO/test.json shows (48 SPO types in 12 chunks of 4) and OpenSPG's default `split_num`."""

NO_SPLIT = -1
"""Chunk size meaning "one prompt with the whole schema" (the authors' `split_num == -1`)."""

Schema: TypeAlias = list[Any] | dict[str, Any]
"""A task schema: a list in the task's shape, or a dict name -> description (the authors' description
form)."""


class PromptError(ValueError):
    """A task, language or chunk size that OneKE has no prompt for; the message says what to use instead."""


class SchemaError(ValueError):
    """A schema that is empty or not in the task's shape; the message says what is wrong and how to fix it."""


# ---------------------------------------------------------------- instruction texts


def check_task(task: str) -> str:
    """Return `task` if OneKE knows it; raise PromptError naming the known tasks otherwise."""
    if task not in INSTRUCTIONS:
        raise PromptError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
    return task


def instruction_text(task: str, lang: str) -> str:
    """The verbatim instruction for `task` in `lang` ("zh" or "en")."""
    texts = INSTRUCTIONS[check_task(task)]
    if lang not in LANGS:
        raise PromptError(f"unknown language {lang!r}: use 'zh' or 'en'")
    if lang not in texts:
        raise PromptError(f"no {lang} instruction text is published for {task}: use lang 'zh'")
    return texts[lang]


def detect_task(instruction: str, schema: Any = None) -> tuple[str, str] | None:
    """(task, lang) whose verbatim instruction `instruction` is, with or without the few-shot suffix.

    Used to recognise the task of the authors' converted files, which often lack a `task` field. RE and SPO share
    their text in the authors' current converter; the schema tells them apart (SPO items name a `predicate`).
    """
    for suffix in EXAMPLE_SUFFIX.values():
        if instruction.endswith(suffix):
            instruction = instruction[: -len(suffix)]
            break
    matches = [
        (task, lang)
        for texts in (INSTRUCTIONS, LEGACY_INSTRUCTIONS)
        for task, by_lang in texts.items()
        for lang, text in by_lang.items()
        if text == instruction
    ]
    if len(matches) > 1:
        wanted = "SPO" if _is_spo_schema(schema) else "RE"
        matches = [match for match in matches if match[0] == wanted] or matches
    return matches[0] if matches else None


def _is_spo_schema(schema: Any) -> bool:
    items = list(schema.values()) if isinstance(schema, dict) else schema
    return isinstance(items, list) and any(isinstance(item, dict) and "predicate" in item for item in items)


# ---------------------------------------------------------------- prompt building


def make_instruction(task: str, schema_chunk: Schema, text: str, lang: str, example: list[Any] | None = None) -> str:
    """The user-turn JSON string, byte for byte as the authors' `multischema_construct_instruction` builds it.

    Keys in the authors' order: instruction, schema, [example,] input. With `example`, the instruction gets
    the few-shot suffix and `example` goes between schema and input, as in the README's few-shot sample.
    """
    instruction = instruction_text(task, lang)
    record: dict[str, Any] = {"instruction": instruction, "schema": schema_chunk}
    if example is not None:
        if lang not in EXAMPLE_SUFFIX:
            raise PromptError(
                f"no {lang} few-shot suffix is published by OneKE's authors: use lang 'zh' with examples, "
                "or drop the examples"
            )
        record["instruction"] = instruction + EXAMPLE_SUFFIX[lang]
        record["example"] = example
    record["input"] = text
    return json.dumps(record, ensure_ascii=False)


# ---------------------------------------------------------------- schema chunking


def split_schema(task: str, schema: Schema, chunk_size: int | None = None) -> list[Schema]:
    """Split a schema into the chunks that become one prompt each (authors' `multischema_split_by_num_test`).

    Chunks of `chunk_size` items (default: the task's CHUNK_SIZES); a remainder of at least
    max(1, chunk_size // 2) items is a chunk of its own, a smaller one joins the last chunk; a schema no
    longer than `chunk_size`, or chunk_size -1, stays whole. A description schema (a dict name -> description)
    is never split: the authors show it as one instruction and their converter has no rule to split it.
    """
    check_task(task)
    size = CHUNK_SIZES[task] if chunk_size is None else chunk_size
    if size != NO_SPLIT and size < 1:
        raise PromptError(f"chunk size must be a positive integer or -1 (no split), got {size}")
    if not schema:
        raise SchemaError(f"the {task} schema is empty: give at least one type")
    if isinstance(schema, dict):
        return [dict(schema)]
    return list(_split_items(list(schema), size))


def _split_items(items: list[Any], size: int) -> list[list[Any]]:
    if size == NO_SPLIT or len(items) <= size:
        return [items]
    full = len(items) // size * size
    chunks = [items[i : i + size] for i in range(0, full, size)]
    rest = items[full:]
    if len(rest) >= max(1, size // 2):
        chunks.append(rest)
    else:
        chunks[-1].extend(rest)
    return chunks


# ---------------------------------------------------------------- schema loading


def load_schema(spec: str, task: str) -> Schema:
    """A schema given inline (text starting with `[` or `{`) or as a file path; see load_schema_file."""
    if spec.lstrip().startswith(("[", "{")):
        return schema_from_text(spec, task, "inline schema")
    return load_schema_file(spec, task)


def load_schema_file(path: str, task: str) -> Schema:
    """Read a schema file: the authors' 3-line schema.json, or one JSON document already in the task's shape.

    The 3-line form (DeepKE `Processer.read_from_file`): line 1 the type list, line 2 the role list, line 3 a
    type -> roles map. It is turned into the task's schema shape (see `_from_three_lines`).
    """
    try:
        text = jsonfile.read_bounded(path, MAX_JSON_BYTES, "give the schema itself").decode("utf-8-sig")
    except FileNotFoundError:
        raise SchemaError(f"schema file {path} does not exist: check the path") from None
    except UnicodeDecodeError as e:
        raise SchemaError(f"schema file {path} is not UTF-8 text ({e.reason}): save it as UTF-8") from None
    except OSError as e:
        raise SchemaError(f"cannot read schema file {path}: {e.strerror}") from None
    return schema_from_text(text, task, f"schema file {path}")


def schema_from_text(text: str, task: str, origin: str) -> Schema:
    """Parse schema text (one JSON document, or the 3-line form) and check it against the task's shape."""
    check_task(task)
    try:
        document = jsonfile.loads(text)
    except jsonfile.JsonLimitError as e:
        raise SchemaError(f"{origin}: {e.msg} (line {e.lineno} column {e.colno})") from None
    except json.JSONDecodeError:
        lines = [line for line in text.split("\n") if line.strip()]
        if len(lines) != 3:
            raise SchemaError(
                f"{origin} is neither one JSON document nor the authors' 3-line schema.json "
                f"(type list, role list, type->roles map): it has {len(lines)} non-empty lines that are not "
                "one JSON value"
            ) from None
        parsed_lines = [_json_line(line, n, origin) for n, line in enumerate(lines, 1)]
        return _from_three_lines(task, parsed_lines, origin)
    return check_schema(task, document, origin)


def _json_line(line: str, number: int, origin: str) -> Any:
    try:
        return jsonfile.loads(line)
    except json.JSONDecodeError as e:
        raise SchemaError(
            f"{origin}, line {number}: not JSON ({e.msg}, column {e.colno}); a schema is one JSON document "
            "or the authors' 3-line schema.json with one JSON value per line"
        ) from None


def _from_three_lines(task: str, lines: list[Any], origin: str) -> Schema:
    """Turn (types, roles, type->roles) into the task's schema, as the authors' processors read them.

    NER/EET: the type list. RE: the role list (RE's schema.json keeps relations on line 2, line 1 empty).
    EE/EEA: each type of line 1 with its roles from line 3. KG: each entity type of line 3 with its
    attributes. SPO: line 1's "subject_predicate_object" names split into the dicts of SPO/test.json.
    """
    types, roles, type_roles = lines
    _check_str_list(types, f"{origin}, line 1 (type list)")
    _check_str_list(roles, f"{origin}, line 2 (role list)")
    _check_type_roles(type_roles, f"{origin}, line 3 (type -> roles map)")
    if task in ("NER", "EET"):
        return _non_empty(types, f"{origin}, line 1 (type list)", task)
    if task == "RE":
        return _non_empty(roles, f"{origin}, line 2 (relation list)", task)
    if task == "SPO":
        return [_spo_entry(name, origin) for name in _non_empty(types, f"{origin}, line 1 (type list)", task)]
    if task == "KG":
        _non_empty(list(type_roles), f"{origin}, line 3 (type -> attributes map)", task)
        return [{"entity_type": t, "attributes": attrs} for t, attrs in type_roles.items()]
    return [_event_entry(task, t, type_roles, origin) for t in _non_empty(types, f"{origin}, line 1", task)]


def _check_str_list(value: Any, where: str) -> None:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise SchemaError(f"{where} must be a JSON list of non-empty strings")


def _check_type_roles(value: Any, where: str) -> None:
    if not isinstance(value, dict) or not all(
        isinstance(roles, list) and all(isinstance(r, str) for r in roles) for roles in value.values()
    ):
        raise SchemaError(f"{where} must be a JSON object mapping each type to a list of role names")


def _non_empty(values: list[Any], where: str, task: str) -> list[Any]:
    if not values:
        raise SchemaError(f"{where} is empty, but the {task} schema is read from it: fill it in")
    return values


def _spo_entry(name: str, origin: str) -> dict[str, str]:
    """The authors' `spotext2schema`: subject type before the first '_', object type after the last, the
    predicate (which may hold '_') between."""
    parts = name.split("_")
    entry = {"subject_type": parts[0], "predicate": "_".join(parts[1:-1]), "object_type": parts[-1]}
    if len(parts) < 3 or not all(entry.values()):
        raise SchemaError(
            f"{origin}, line 1: SPO type {name!r} is not 'subject_predicate_object' with three non-empty "
            'parts; give a plain JSON schema [{"subject_type", "predicate", "object_type"}] instead'
        )
    return entry


def _event_entry(task: str, event_type: str, type_roles: dict[str, Any], origin: str) -> dict[str, Any]:
    if event_type not in type_roles:
        raise SchemaError(
            f'{origin}, line 3 has no roles for event type {event_type!r}: add "{event_type}": [roles...]'
        )
    if task == "EE":
        return {"event_type": event_type, "trigger": True, "arguments": type_roles[event_type]}
    return {"event_type": event_type, "arguments": type_roles[event_type]}


_ENTRY_KEYS: dict[str, tuple[str, ...]] = {
    "EE": ("event_type", "arguments"),
    "EEA": ("event_type", "arguments"),
    "KG": ("entity_type", "attributes"),
    "SPO": ("subject_type", "predicate", "object_type"),
}


def check_schema(task: str, schema: Any, origin: str = "schema") -> Schema:
    """Check a plain JSON schema against the task's shape (README "Schema shapes"); return it unchanged.

    NER/RE/EET: a list of names or a dict name -> description. EE/EEA/KG/SPO: a list of dicts with the keys
    of the task's shape (EE may also use the authors' dict form event_type -> {description, trigger, ...}).
    """
    check_task(task)
    if isinstance(schema, dict):
        if task in _ENTRY_KEYS and task != "EE":
            raise SchemaError(f"{origin}: a {task} schema must be a JSON list of objects {_shape(task)}")
        if not schema:
            raise SchemaError(f"{origin} is empty: give at least one type")
        return schema
    if not isinstance(schema, list):
        raise SchemaError(
            f"{origin} must be a JSON list (or the authors' 3-line schema.json), got {value_kind(schema)}"
        )
    if not schema:
        raise SchemaError(f"{origin} is empty: give at least one type")
    for n, entry in enumerate(schema, 1):
        _check_entry(task, entry, f"{origin}, item {n}")
    return schema


def _check_entry(task: str, entry: Any, where: str) -> None:
    if task not in _ENTRY_KEYS:
        if not isinstance(entry, str) or not entry:
            raise SchemaError(f"{where}: a {task} schema lists type names (non-empty strings), got {value_kind(entry)}")
        return
    if not isinstance(entry, dict) or not all(key in entry for key in _ENTRY_KEYS[task]):
        raise SchemaError(f"{where}: each {task} schema item must be an object {_shape(task)}")


def _shape(task: str) -> str:
    return "{" + ", ".join(f'"{key}"' for key in _ENTRY_KEYS[task]) + "}"


def value_kind(value: Any) -> str:
    """'an object', 'a list', ... for messages about JSON values of the wrong kind."""
    names: dict[type, str] = {dict: "an object", list: "a list", str: "a string"}
    return names.get(type(value), type(value).__name__)
