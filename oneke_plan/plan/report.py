"""What a plan says, in three forms: the summary's rows (with a compact bar per device), the JSON document of
`oneke-plan --format json`, and the SVG picture of `--plot`. Plain text and plain data: no plotting library.

Every figure comes from the profile (what oneke-run applies) and the plan's placement (which layers went where), so
the three forms and the YAML profile cannot disagree.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from oneke_plan import __version__
from oneke_plan.core.records import to_data
from oneke_plan.core.sizes import format_bytes
from oneke_plan.io.files import starts_with
from oneke_plan.plan.fit import DeviceEstimate
from oneke_plan.plan.profile import ProfileDevice

if TYPE_CHECKING:  # annotations only: the summary and the picture read a plan, never make one
    from oneke_plan.plan.plans import Plan, PlanResult

JSON_VERSION = 1  # bumped when a key of the JSON document changes meaning (docs/profile-format.md)
TERMS = ("weights_bytes", "kv_cache_bytes", "workspace_bytes", "reserve_bytes")
TERM_NAMES = {"weights_bytes": "weights", "kv_cache_bytes": "KV cache", "workspace_bytes": "workspace",
              "reserve_bytes": "reserve"}  # fmt: skip
BAR_CHARS = {"weights_bytes": "W", "kv_cache_bytes": "K", "workspace_bytes": "x", "reserve_bytes": "r"}
BAR_LEGEND = "bar: W weights, K KV cache, x workspace, r reserve, . free (of the memory the plan may use)"
BAR_WIDTH = 16
SVG_MARK = "<!-- drawn by oneke-plan: the memory of each device of a plan -->"  # no "--" inside: XML forbids it
SVG_COLOURS = {"weights_bytes": "#4C72B0", "kv_cache_bytes": "#DD8452", "workspace_bytes": "#55A868",
               "reserve_bytes": "#8C8C8C"}  # fmt: skip


@dataclass(frozen=True)
class DeviceRow:
    """One device of one model copy, as the summary, the JSON document and the picture show it."""

    replica: int
    device: ProfileDevice
    estimate: DeviceEstimate
    layers: tuple[int, int] | None  # the first and last decoder layer stored there (from 0); None: none

    @property
    def capacity_bytes(self) -> int | None:
        """What the plan may fill: the usable memory (free memory when detected), else the total."""
        return self.device.usable_bytes if self.device.usable_bytes is not None else self.device.total_bytes

    @property
    def layers_text(self) -> str:
        if self.layers is None:
            return "-"
        first, last = self.layers
        return str(first) if first == last else f"{first}-{last}"


def device_rows(result: PlanResult) -> list[DeviceRow]:
    """Every device of every copy of the model, in profile order."""
    plans = result.replicas or [result.plan]
    several = len(plans) > 1
    rows = []
    for index, plan in enumerate(plans):
        copy = result.profile.replica(index) if several else result.profile
        for device in copy.devices:
            rows.append(DeviceRow(index, device, copy.estimate_on(device.id), _layer_span(plan, device.id)))
    return rows


def _layer_span(plan: Plan, device_id: int | str) -> tuple[int, int] | None:
    layers = [c.name for c in plan.costs if c.kind == "layer"]
    mine = [i for i, name in enumerate(layers) if plan.placement.assignment.get(name) == device_id]
    return (mine[0], mine[-1]) if mine else None


def bar(row: DeviceRow, width: int = BAR_WIDTH) -> str:
    """The device's memory as `width` characters, each term in proportion to what the plan may use, rounded by
    largest remainder (the characters add up to the rounded total, and a term never takes a larger one's place);
    '-' for a device without a bound."""
    capacity = row.capacity_bytes
    if not capacity:
        return "-"
    values = [getattr(row.estimate, term) for term in TERMS]
    scale = width / max(capacity, sum(values))
    shares = [v * scale for v in values]
    counts = [int(share) for share in shares]
    wanted = min(width, round(sum(shares)))
    by_remainder = sorted(range(len(shares)), key=lambda i: counts[i] - shares[i])
    for i in by_remainder[: max(wanted - sum(counts), 0)]:
        counts[i] += 1
    used = "".join(BAR_CHARS[term] * n for term, n in zip(TERMS, counts, strict=True))
    return "[" + used + "." * (width - len(used)) + "]"


def speed_lines(speed: dict[str, Any] | None, batch_size: int, context: int) -> list[str]:
    """The summary's speed: decode and prefill tokens/s and records per hour, or why a figure is unknown."""
    if not speed:
        return []
    known = []
    if speed.get("decode_tokens_per_second") is not None:
        known.append(f"decode {speed['decode_tokens_per_second']:,.1f} tokens/s (batch {batch_size}, at {context} "
                     "tokens of context)")  # fmt: skip
    if speed.get("prefill_tokens_per_second") is not None:
        known.append(f"prefill {speed['prefill_tokens_per_second']:,.0f} tokens/s")
    if speed.get("records_per_hour") is not None:
        known.append(f"{speed['records_per_hour']:,.0f} records/hour")
    copies = speed.get("copies")
    whose = f" ({copies} copies together)" if copies else ""
    lines = []
    if known:
        lines.append(f"speed{whose}, at most (vendor or given peaks: docs/memory-model.md): " + ", ".join(known))
    lines += [f"speed unknown: {line}" for line in speed.get("unknown", [])]
    return lines


# -- JSON ------------------------------------------------------------------------------------------------------
def plan_document(result: PlanResult) -> dict[str, Any]:
    """The JSON document: `profile` (exactly the YAML profile's content) and `summary` (its figures per device,
    the speed, what solving found). Keys are documented in docs/profile-format.md, "JSON output"."""
    profile = result.profile
    plan = result.plan
    quant = profile.quantization.mode
    devices = []
    for row in device_rows(result):
        used = row.estimate.total_bytes
        capacity = row.capacity_bytes
        devices.append(
            {
                "replica": row.replica,
                "id": row.device.id,
                "name": row.device.name,
                "total_bytes": row.device.total_bytes,
                "usable_bytes": capacity,
                "used_bytes": used,
                **{term: getattr(row.estimate, term) for term in TERMS},
                "free_bytes": None if capacity is None else capacity - used,
                "layers": None if row.layers is None else list(row.layers),
            }
        )
    speed = profile.speed or {}
    return {
        "oneke_plan_json": JSON_VERSION,
        "created_by": f"oneke-plan {__version__}",
        "profile": profile.to_data(),  # the same keys, in the same order, as the YAML file
        "summary": {
            "model": profile.model.source,
            "architecture": plan.layout.architecture,
            "parameter_count": plan.layout.parameter_count,
            "dtype": profile.dtype,
            "quantization": quant,
            "workload": to_data(profile.workload),
            "replicas": profile.replica_count,
            "nodes": profile.nodes,
            "devices": devices,
            "speed": {
                key: speed.get(key)
                for key in ("decode_tokens_per_second", "prefill_tokens_per_second", "records_per_hour")
            }
            | {"unknown": list(speed.get("unknown", []))},
            "solved": result.solved,
            "unused_gpus": list(result.unused_gpus),
            "gpu_only_options": result.gpu_only_options,
            "notes": list(profile.notes),
        },
    }


def device_label(device_id: int | str) -> str:
    """'GPU 0' for a GPU index; 'cpu' and 'disk' as they are."""
    return device_id if isinstance(device_id, str) else f"GPU {device_id}"


# -- SVG -------------------------------------------------------------------------------------------------------
SVG_FONT = 12  # px: every text but the title
SVG_TITLE_FONT = 14
SVG_LINE = 16  # px between the lines under a bar
SVG_MARGIN = 20
SVG_BAR = 60  # a bar's width
SVG_GAP = 24  # between one device's texts and the next device's
SVG_NAME_WIDTH = 150  # a device name longer than this wraps at its spaces


def text_width(text: str, size: float) -> float:
    """How wide `text` is drawn at font size `size` (px), never less than in DejaVu Sans, the widest of the common
    sans-serif fonts (Helvetica and Arial are narrower): the picture is sized from its texts, so nothing is clipped
    and no two labels overlap whatever font the viewer picks. A character of a wide script (CJK) takes 1 em, as in
    the fonts that draw them; any other non-ASCII character 1.75 em, DejaVu Sans' widest (names are rarely made of
    them: a wider picture is the cost)."""
    return size * sum(_em(c) for c in text)


def _em(c: str) -> float:
    import unicodedata

    if unicodedata.east_asian_width(c) in "WF" or c in "MWmw@%#&~+=<>^":
        return 1.0
    if ord(c) > 127:
        return 1.75
    if c.isupper():
        return 0.8
    return 0.65  # DejaVu Sans: digits 0.64, the widest other lower-case letters and signs 0.64


def _wrapped(text: str, width: float, size: float) -> list[str]:
    """`text` in lines no wider than `width` where its spaces allow (a longer word is a line of its own)."""
    lines: list[str] = []
    for word in text.split(" "):
        if lines and text_width(f"{lines[-1]} {word}", size) <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines


def _xml_text(text: str) -> str:
    """`text` escaped for XML, characters XML 1.0 forbids (control characters from a device's name) as U+FFFD."""
    from xml.sax.saxutils import escape  # only when a picture is asked for: it imports urllib (16 ms of start-up)

    allowed = "".join(c if c in "\t\n\r" or (" " <= c <= "\ud7ff") or ("\ue000" <= c <= "\ufffd") or c > "\uffff"
                      else "\ufffd" for c in text)  # fmt: skip
    return escape(allowed, {'"': "&quot;"})


def plot_svg(result: PlanResult) -> str:
    """Per device, its four terms stacked from the bottom against the memory the plan may use (an outlined box):
    heights in proportion to bytes, one scale for every device (the largest capacity fills the chart). Every box
    carries its figure as `data-bytes` (and `data-term`, `data-device`), so a reader can check the picture.

    The picture is sized from its texts (text_width): each device's column is as wide as its widest line (its
    label, its name wrapped at SVG_NAME_WIDTH, what it uses, of how much), the legend sits right of the last
    column, and the canvas holds the title, the columns and the legend."""
    rows = device_rows(result)
    several = len({r.replica for r in rows}) > 1
    chart, top, left = 260.0, 70.0, float(SVG_MARGIN)
    scale_bytes = max((r.capacity_bytes or r.estimate.total_bytes for r in rows), default=1) or 1
    w = result.profile.workload
    title = (f"{result.profile.model.source}: {result.profile.dtype}, quantization "
             f"{result.profile.quantization.mode}, batch {w.batch_size} x ({w.max_input_tokens} in + "
             f"{w.max_new_tokens} new) tokens")  # fmt: skip
    subtitle = f"memory per device: one scale, {format_bytes(scale_bytes)} = the full height"
    base = top + chart
    body: list[str] = []
    x = left
    lowest = base
    for row in rows:
        label = (f"r{row.replica} " if several else "") + device_label(row.device.id)
        capacity = row.capacity_bytes
        texts = [(label, "")]
        if row.device.name and row.device.name != label:
            texts += [(line, "#555") for line in _wrapped(row.device.name, SVG_NAME_WIDTH, SVG_FONT)]
        total = "unbounded" if capacity is None else format_bytes(capacity)
        texts += [(f"{format_bytes(row.estimate.total_bytes)} used", "#555"), (f"of {total}", "#555")]
        column = max(SVG_BAR, *(text_width(t, SVG_FONT) for t, _ in texts))
        device = _xml_text(str(row.device.id))
        if capacity:
            h = capacity * chart / scale_bytes
            body.append(
                f'<rect class="capacity" data-device="{device}" data-bytes="{capacity}" x="{x:.3f}" '
                f'y="{base - h:.3f}" width="{SVG_BAR}" height="{h:.3f}" fill="none" stroke="#222" '
                'stroke-dasharray="4 2"/>'
            )
        y = base
        for term in TERMS:
            value = getattr(row.estimate, term)
            h = value * chart / scale_bytes
            y -= h
            body.append(
                f'<rect class="term" data-device="{device}" data-term="{term}" data-bytes="{value}" x="{x:.3f}" '
                f'y="{y:.3f}" width="{SVG_BAR}" height="{h:.3f}" fill="{SVG_COLOURS[term]}">'
                f"<title>{_xml_text(label)} {TERM_NAMES[term]}: {format_bytes(value)}</title></rect>"
            )
        for n, (text, colour) in enumerate(texts):
            fill = f' fill="{colour}"' if colour else ""
            line_y = base + 18 + SVG_LINE * n
            lowest = max(lowest, line_y)
            body.append(f'<text class="label" x="{x:.3f}" y="{line_y:.3f}"{fill}>{_xml_text(text)}</text>')
        x += column + SVG_GAP
    legend_x = x + 10 - SVG_GAP
    legend = [*(TERM_NAMES[term] for term in TERMS), "memory the plan may use"]
    for j, text in enumerate(legend):
        y = top + 20 * j
        if j < len(TERMS):
            body.append(f'<rect x="{legend_x:.3f}" y="{y}" width="12" height="12" fill="{SVG_COLOURS[TERMS[j]]}"/>')
        else:
            body.append(f'<rect x="{legend_x:.3f}" y="{y}" width="12" height="12" fill="none" stroke="#222" '
                        'stroke-dasharray="4 2"/>')  # fmt: skip
        body.append(f'<text class="legend" x="{legend_x + 18:.3f}" y="{y + 11}">{_xml_text(text)}</text>')
    width = math.ceil(
        SVG_MARGIN
        + max(
            legend_x + 18 + max(text_width(t, SVG_FONT) for t in legend),
            left + text_width(title, SVG_TITLE_FONT),
            left + text_width(subtitle, SVG_FONT),
        )
    )
    height = math.ceil(max(lowest, top + 20 * len(legend)) + SVG_MARGIN)
    out = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        SVG_MARK,
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="{SVG_FONT}">',
        f"<title>{_xml_text(title)}</title>",
        f'<text class="title" x="{left}" y="24" font-size="{SVG_TITLE_FONT}">{_xml_text(title)}</text>',
        f'<text class="subtitle" x="{left}" y="44" fill="#555">{_xml_text(subtitle)}</text>',
        *body,
        "</svg>",
    ]
    return "\n".join(out) + "\n"


def drawn_by_oneke_plan(path: Path) -> bool:
    """Whether `path` starts as every picture plot_svg draws does (read as bytes, never parsed)."""
    return starts_with(path, rb'<\?xml version="1.0" encoding="UTF-8"\?>\n' + re.escape(SVG_MARK.encode()))
