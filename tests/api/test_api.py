"""The Python API (oneke_plan/api/) against independent routes, and README's example run as it is written.

- plan -> load -> extract in memory: each answer equals transformers' own greedy `generate` on that prompt alone
  (float32, where batching changes no rounding), and the model is the one from_pretrained loads;
- extract to a file, stopped after two answers and resumed: each line is in the journal when it is yielded, and the
  output file is byte for byte the one oneke-run writes for the same input in one go;
- README's "Python API" code block, executed against a tiny checkpoint where `make demo` puts one (its OneKE plan
  is the checked-in profile's).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import llama2_zh_ids
from reference import alone
from transformers import AutoModelForCausalLM

from oneke_plan import api
from oneke_plan.cli.run import main as run_main
from oneke_plan.core.errors import BadInput
from oneke_plan.extract.outputs import journal_path
from oneke_plan.measure.compat import dtype_kw
from oneke_plan.plan.profile import Profile, read_profile

pytestmark = pytest.mark.usefixtures("single_torch_thread")

ROOT = Path(__file__).parents[2]
MAX_NEW = 8


class Notes(api.Report):
    """A Report that keeps what it is told."""

    def __init__(self) -> None:
        self.notes: list[str] = []
        self.loaded: list[dict[int | str, int]] = []

    def note(self, text: str) -> None:
        self.notes.append(text)

    def weights_loaded(self, profile: Profile, loaded_bytes: dict[int | str, int]) -> None:
        self.loaded.append(loaded_bytes)


@pytest.fixture(scope="module")
def fp32_profile(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny bf16 checkpoint planned in float32 for 16 GiB of host memory, written where oneke-run reads it."""
    path = tmp_path_factory.mktemp("api") / "tiny-fp32.yaml"
    api.plan(
        tiny_model_dir, cpu_memory="16GiB", dtype="float32", max_input_tokens=1024, max_new_tokens=MAX_NEW,
        batch_size=4, output=path, report=Notes(),
    )  # fmt: skip
    return path


def test_plan_load_extract_answers_equal_transformers_generate(
    fp32_profile: Path, tiny_model_dir: Path, deepke_dir: Path
) -> None:
    report = Notes()
    profile = api.read_profile(fp32_profile)
    model, tokenizer = api.load(profile, report=report)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, **dtype_kw(torch.float32)).eval()
    assert {name: p.dtype for name, p in model.named_parameters()} == {
        name: p.dtype for name, p in reference.named_parameters()
    }
    tensors = {id(t): t for t in [*reference.parameters(), *reference.buffers()]}.values()
    assert report.loaded == [{"cpu": sum(t.numel() * t.element_size() for t in tensors)}]

    records = api.read_records(deepke_dir / "RE" / "test.json")
    extraction = api.extract(model, tokenizer, profile, records, batch_size=3)
    lines = list(extraction)
    assert sorted(line["key"] for line in lines) == sorted(r.key for r in records)
    assert extraction.stats.prompts == extraction.pending == len(records)
    for record in records:  # the prompt's ids from the template written out (conftest), not runner.encode_prompts
        ids = llama2_zh_ids(tokenizer, record.instruction)
        want = tokenizer.decode(alone(reference, ids, [tokenizer.eos_token_id], MAX_NEW), skip_special_tokens=True)
        assert next(line for line in lines if line["key"] == record.key)["raw_output"] == want, record.key


def test_extract_to_a_file_stops_resumes_and_writes_what_oneke_run_writes(
    fp32_profile: Path, deepke_dir: Path, tmp_path: Path
) -> None:
    source = deepke_dir / "NER" / "test.json"
    profile = api.read_profile(fp32_profile)
    model, tokenizer = api.load(profile, report=Notes())
    records = api.read_records(source)
    out = tmp_path / "api.jsonl"
    first = api.extract(model, tokenizer, profile, records, out, input=source, batch_size=2)
    for count, line in enumerate(first, 1):
        journaled = [json.loads(raw) for raw in journal_path(out).read_text(encoding="utf-8").splitlines()[1:]]
        assert journaled[-1] == line and len(journaled) == count  # on disk before it is handed over
        if count == 2:
            break
    assert not out.exists() and journal_path(out).exists()
    with pytest.raises(BadInput, match="pass --resume to continue it"):
        list(api.extract(model, tokenizer, profile, records, out, input=source))
    rest = list(api.extract(model, tokenizer, profile, records, out, input=source, resume=True))
    assert len(rest) == len(records) - 2 and not journal_path(out).exists()

    by_cli = tmp_path / "cli.jsonl"
    argv = ["--profile", str(fp32_profile), "--input", str(source), "--output", str(by_cli), "--no-progress"]
    assert run_main(argv) == 0
    assert out.read_bytes() == by_cli.read_bytes()


def test_the_api_refuses_what_the_clis_refuse(fp32_profile: Path, deepke_dir: Path) -> None:
    with pytest.raises(BadInput, match=r"^--quantize '8-bit': give one of 'none', '8bit', '4bit'$"):
        api.plan("oneke", gpus=["24GiB"], quantize="8-bit")
    with pytest.raises(BadInput, match=r"^--replicas 'two': give a number of replicas, or auto$"):
        api.plan("oneke", gpus=["24GiB"], replicas="two")
    profile = api.read_profile(fp32_profile)
    records = api.read_records(deepke_dir / "NER" / "test.json")
    with pytest.raises(BadInput, match=r"^--batch-size 5 is more than the profile planned for \(4\)"):
        api.extract(None, None, profile, records, batch_size=5)
    with pytest.raises(BadInput, match="give output=PATH"):
        api.extract(None, None, profile, records, resume=True)
    with pytest.raises(BadInput, match="--schema needs --task"):
        api.read_records(deepke_dir / "NER" / "test.json", schema=["人物"])


def test_raw_text_reads_as_oneke_run_reads_it_and_notes_what_it_skips(deepke_dir: Path, tmp_path: Path) -> None:
    texts = tmp_path / "texts.jsonl"
    texts.write_text('{"text": "周星驰主演了喜剧之王。"}\n', encoding="utf-8")
    from_list = api.read_records(texts, task="ner", schema=["人物", "组织机构"])
    assert from_list == api.read_records(texts, task="NER", schema='["人物", "组织机构"]') and len(from_list) == 1

    events = tmp_path / "events.jsonl"
    first = (deepke_dir / "EEA" / "sample.json").read_text(encoding="utf-8").splitlines()[0]
    events.write_text(first + '\n{"text": "无事发生。", "event": []}\n', encoding="utf-8")
    report = Notes()
    records = api.read_records(events, task="EEA", schema=str(deepke_dir / "EEA" / "schema.json"), report=report)
    assert {r.key.split(":")[0] for r in records} == {"1"}
    assert len(report.notes) == 1 and report.notes[0].endswith("lines 2")


# -- README's example ----------------------------------------------------------------------------------------------
def readme_example() -> str:
    """The one ```python block of README.md's "Python API" section."""
    section = (ROOT / "README.md").read_text(encoding="utf-8").split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "README's Python API section must hold one python block"
    return str(blocks[0])


def test_readme_python_example_runs(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Run from a folder laid out like this repository after `make demo`: out/tiny-model and examples/deepke."""
    shutil.copytree(tiny_model_dir, tmp_path / "out" / "tiny-model")
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_example(), "README.md", "exec"), {"__name__": "readme_example"})
    printed = capsys.readouterr().out.splitlines()
    checked_in = read_profile(ROOT / "profiles" / "oneke-24gib+12gib-bf16.yaml")  # test_profiles keeps it current
    assert printed[0] == str({gpu: f"{e.total_bytes / 2**30:.2f} GiB" for gpu, e in checked_in.estimate.items()})
    ids = [json.loads(line)["id"][:8] for line in (ROOT / "examples/deepke/NER/test.json").read_text().splitlines()]
    assert sorted(line.split()[0] for line in printed[1:]) == sorted(ids[:2])
