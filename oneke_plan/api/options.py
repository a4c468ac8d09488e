"""What the Python API takes: the values each choice allows, the default workload, and Report, where it says what
it finds while it works."""

from __future__ import annotations

import logging
import os

from oneke_plan.plan.memory import QUANT_TYPES as QUANT_TYPES  # re-exported: declared with Quantization
from oneke_plan.plan.memory import Workload
from oneke_plan.plan.profile import Profile

log = logging.getLogger("oneke_plan")


DEFAULT_WORKLOAD = Workload(max_input_tokens=512, max_new_tokens=512, batch_size=4)
"""What oneke-plan plans for unless told otherwise: tokens per prompt, tokens per answer, prompts per batch."""

# The values each choice takes (the CLIs offer the same ones).
DTYPES = ("auto", "bfloat16", "float16", "float32")
STRATEGIES = ("fill", "balanced")
SOLVE_FOR = ("max-input-tokens", "batch-size")
LANGUAGES = ("zh", "en")

PathLike = str | os.PathLike[str]


class Report:
    """Where the API says what it finds while it works. This default logs notes as warnings on the `oneke_plan`
    logger (Python prints those to stderr unless logging is configured) and the loaded weights at info level;
    oneke-plan and oneke-run print them instead."""

    def note(self, text: str) -> None:
        """One line: something the user should know (a skipped input line, what force=True let through)."""
        log.warning(text)

    def weights_loaded(self, profile: Profile, loaded_bytes: dict[int | str, int]) -> None:
        """Right after loading, before the finite-output check: the bytes of the model's weights on each device of
        `profile` (GPU index, "cpu", "disk"), as loaded (loaded_weights.measured_weight_bytes)."""
        planned = {d: e.weights_bytes for d, e in profile.estimate.items()}
        log.info("weights per device, loaded (bytes): %s; planned: %s", loaded_bytes, planned)
