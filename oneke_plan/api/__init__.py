"""The flows and the Python API: oneke-plan's planner and oneke-run's run, as functions for a script or a notebook.

    from oneke_plan import api

    profile = api.plan("oneke", gpus=["24GiB", "12GiB"]).profile   # OneKE's placement on that machine
    model, tokenizer = api.load(profile, "/models/OneKE")          # loaded as planned, after the same checks
    records = api.read_records("examples/deepke/NER/test.json")    # DeepKE's converted file, or raw text + task
    for line in api.extract(model, tokenizer, profile, records):   # each answer as soon as it is done
        print(line["id"], line.get("parsed"))

- plan: a model for a machine (described GPUs, an inventory file, or those detected) -> PlanResult, whose `profile`
  is what oneke-plan writes (`output=` writes it, with oneke-plan's rules for replacing a file);
- load: a profile -> (model, tokenizer), checked as oneke-run checks (machine, tokenizer, checkpoint names,
  device_map, weights per device, finite logits);
- read_records / extract: prompts -> answer lines (docs/output-format.md), batched as oneke-run batches them, in
  memory or journaled to an output file exactly as oneke-run writes it (resume, overwrite, out-of-memory retries);
- run: oneke-run itself (profile file and input file in, output file out, torchrun workers), returning RunSummary.

plan and run take their command's options as one object, PlanOptions or RunOptions (a field per flag, with its
default), or its fields as keyword arguments: api.plan("oneke", options=PlanOptions(batch_size=8)) and
api.plan("oneke", batch_size=8) are the same plan.

Errors are oneke_plan.core.errors': BadInput (what the user gave is wrong; exit 2 in the CLIs) and DoesNotFit (the model
does not fit, or the machine does not match the profile; exit 3), each one line that says what to do; the flags it
names are the CLIs', each a field of PlanOptions or RunOptions. Sizes are ints in bytes, or strings such as "24GiB"
(GiB = 2**30 bytes, GB = 10**9); a GPU's memory (`gpus`) is a string with its unit ("24GiB"), never a bare number.
Notes (what a step found; what force=True let through) go to a Report: the default
logs them on the `oneke_plan` logger.

The CLIs are flag parsing and printing around these functions (oneke_plan/cli/).
"""

from oneke_plan.api.extraction import Extraction, extract, read_records
from oneke_plan.api.loading import load
from oneke_plan.api.options import (
    DEFAULT_WORKLOAD,
    DTYPES,
    LANGUAGES,
    QUANT_TYPES,
    SOLVE_FOR,
    STRATEGIES,
    PlanOptions,
    Report,
    RunOptions,
)
from oneke_plan.api.planning import plan, plan_document
from oneke_plan.api.running import GpuMemory, RunSummary, gpu_memory, run
from oneke_plan.extract.engines import ENGINES
from oneke_plan.plan.profile import read_profile

__all__ = [
    "DEFAULT_WORKLOAD",
    "DTYPES",
    "ENGINES",
    "LANGUAGES",
    "QUANT_TYPES",
    "SOLVE_FOR",
    "STRATEGIES",
    "Extraction",
    "GpuMemory",
    "PlanOptions",
    "Report",
    "RunOptions",
    "RunSummary",
    "extract",
    "gpu_memory",
    "load",
    "plan",
    "plan_document",
    "read_profile",
    "read_records",
    "run",
]
