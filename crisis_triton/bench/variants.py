"""Export variants measured side by side (`crisis-benchmark --variants`), and issue 25's targets.

A variant is a set of crisis-export options that changes what the served models compute, not the
weights: `fixed-text` (--fixed-text-length: every text as 77 tokens, the exports before
2026-12-06), `own-text` (the default export: text at its own length) and `fast-image`
(--fast-image, gated: the cheaper image path, text at its own length). Every precision of a run is
exported once per variant; the comparison puts the variants of one precision next to each other,
against the reference variant (`fixed-text` where measured, else the first), with the targets of
issue 25 judged from the measured numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from crisis_triton.contract.spec import PREPROCESS, TEXT_ENCODER

Row = dict[str, Any]


@dataclass(frozen=True)
class Variant:
    """One export variant: its name (the rows' `variant`), its crisis-export options, and what it
    is for."""

    name: str
    fixed_text_length: bool = False  # crisis-export --fixed-text-length
    fast_image: bool = False  # crisis-export --fast-image (gated; a failed gate fails the run)
    about: str = ""

    def export_options(self) -> list[str]:
        """The crisis-export options of this variant."""
        return (["--fixed-text-length"] if self.fixed_text_length else []) + (
            ["--fast-image"] if self.fast_image else []
        )


FIXED_TEXT = Variant("fixed-text", fixed_text_length=True, about="every text as 77 tokens")
OWN_TEXT = Variant("own-text", about="text at its own length (the default export)")
FAST_IMAGE = Variant(
    "fast-image", fast_image=True, about="own-length text and the gated cheaper image path"
)
VARIANTS = {v.name: v for v in (FIXED_TEXT, OWN_TEXT, FAST_IMAGE)}
DEFAULT_VARIANT = OWN_TEXT.name

# Issue 25's goals (ratios of one variant's measured numbers over another's, same precision and
# protocol; throughput at the highest concurrency measured, compute per inference at it).
TEXT_COMPUTE_GOAL = 0.7  # own-text / fixed-text text-encoder compute per inference, at most
PREPROCESS_COMPUTE_GOAL = 0.7  # fast-image / own-text preprocess compute per inference, at most
THROUGHPUT_GOAL = 1.05  # own-text / fixed-text and fast-image / own-text throughput, at least
BEST_OVER_TODAY_GOAL = 1.3  # best variant of any precision / best fixed-text one, at least
FP32_OWN_TEXT_GOAL = 1.15  # fp32 own-text / fp32 fixed-text throughput, at least
FP32 = "fp32"


def parse(text: str) -> list[str]:
    """A comma list of distinct variant names (ValueError otherwise)."""
    out = [x.strip() for x in text.split(",") if x.strip()]
    if not out or len(set(out)) != len(out) or any(x not in VARIANTS for x in out):
        raise ValueError(f"{text!r}: a comma list of distinct variants of {list(VARIANTS)}")
    return out


def of_repository(fixed_text_length: bool, fast_image: bool) -> str:
    """The variant name an exported repository's settings describe (`custom` for none)."""
    for v in VARIANTS.values():
        if (v.fixed_text_length, v.fast_image) == (fixed_text_length, fast_image):
            return v.name
    return "fixed-text+fast-image" if fixed_text_length else "custom"


# -------------------------------------------------------------------------------- comparison


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _triton(rows: Sequence[Row], precision: str, variant: str, protocol: str) -> list[Row]:
    return [
        r
        for r in rows
        if r["path"] == "triton"
        and r.get("mode", "closed") == "closed"
        and not r["errors"]
        and r.get("precision") == precision
        and r.get("variant") == variant
        and r["protocol"] == protocol
    ]


def _per_inference(row: Row | None, model: str) -> float | None:
    split = ((row or {}).get("server") or {}).get(model) or {}
    return split.get("compute_infer_per_inference_ms")


def protocol_of(rows: Sequence[Row]) -> str | None:
    """The protocol the comparison reads: grpc where measured, else the first Triton row's."""
    protocols = [r["protocol"] for r in rows if r["path"] == "triton"]
    return "grpc" if "grpc" in protocols else next(iter(protocols), None)


def entry(rows: Sequence[Row], precision: str, variant: str, protocol: str) -> dict[str, Any]:
    """One (precision, variant): throughput at its highest concurrency, c=1 p50, and the text
    encoder's and the preprocess model's compute per inference at that highest concurrency."""
    mine = _triton(rows, precision, variant, protocol)
    top = max(mine, key=lambda r: r["concurrency"], default=None)
    c1 = next((r for r in mine if r["concurrency"] == 1), None)
    return {
        "precision": precision,
        "variant": variant,
        "concurrency": top["concurrency"] if top else None,
        "throughput_rps": top["throughput_rps"] if top else None,
        "c1_p50_ms": c1["p50_ms"] if c1 else None,
        "text_compute_ms": _per_inference(top, TEXT_ENCODER),
        "preprocess_compute_ms": _per_inference(top, PREPROCESS),
    }


def compare(
    rows: Sequence[Row], variants: Sequence[str], machine: dict[str, Any]
) -> dict[str, Any] | None:
    """The variants' comparison (summary.json's `variants`), None with fewer than two variants or
    no Triton rows: per precision and variant the measured figures and their ratios over the
    reference variant, the issue's targets met or missed, and the machine's CPU flags."""
    protocol = protocol_of(rows)
    if len(variants) < 2 or protocol is None:
        return None
    reference = FIXED_TEXT.name if FIXED_TEXT.name in variants else variants[0]
    precisions = list(dict.fromkeys(str(r.get("precision")) for r in rows if r["path"] == "triton"))
    table: list[dict[str, Any]] = []
    for precision in precisions:
        ref = entry(rows, precision, reference, protocol)
        for variant in variants:
            e = entry(rows, precision, variant, protocol)
            e["over_reference"] = {
                k: _ratio(e[k], ref[k])
                for k in ("throughput_rps", "c1_p50_ms", "text_compute_ms", "preprocess_compute_ms")
            }
            table.append(e)
    return {
        "protocol": protocol,
        "reference": reference,
        "cpu_class": machine.get("cpu_class"),
        "cpu_flags": machine.get("simd"),
        "entries": table,
        "targets": targets(table),
    }


def _find(table: Sequence[dict[str, Any]], precision: str, variant: str) -> dict[str, Any] | None:
    return next((e for e in table if (e["precision"], e["variant"]) == (precision, variant)), None)


def _target(
    name: str, a: float | None, b: float | None, goal: float, at_most: bool, detail: str
) -> dict[str, Any]:
    value = _ratio(a, b)
    met = None if value is None else (value <= goal if at_most else value >= goal)
    return {
        "target": name,
        "measured": value,
        "goal": f"{'<=' if at_most else '>='} {goal}",
        "met": met,
        "detail": detail if value is not None else "missing rows",
    }


def _fig(e: dict[str, Any] | None, key: str, unit: str) -> str:
    """One entry's figure for a target's detail: ms to 3 decimals, req/s to 2."""
    v = None if e is None else e[key]
    return "-" if v is None else f"{v:.{3 if unit == 'ms' else 2}f} {unit}"


def targets(table: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 25's targets from the comparison's entries: per precision own-text vs fixed-text
    (text compute, throughput) and fast-image vs own-text (preprocess compute, throughput); the
    best variant of any precision vs the best fixed-text one; fp32 own-text vs fixed-text."""
    out: list[dict[str, Any]] = []
    precisions = list(dict.fromkeys(e["precision"] for e in table))
    pairs = (
        (OWN_TEXT, FIXED_TEXT, "text_compute_ms", TEXT_COMPUTE_GOAL, "text encoder"),
        (FAST_IMAGE, OWN_TEXT, "preprocess_compute_ms", PREPROCESS_COMPUTE_GOAL, "preprocess"),
    )
    for precision in precisions:
        for new, old, key, goal, step in pairs:
            a, b = _find(table, precision, new.name), _find(table, precision, old.name)
            if a is None or b is None:
                continue
            out.append(
                _target(
                    f"{precision}: {step} compute per inference, {new.name} / {old.name}",
                    a[key], b[key], goal, True,
                    f"{_fig(a, key, 'ms')} vs {_fig(b, key, 'ms')} (c={a['concurrency']})",
                )
            )  # fmt: skip
            out.append(
                _target(
                    f"{precision}: throughput, {new.name} / {old.name}",
                    a["throughput_rps"], b["throughput_rps"], THROUGHPUT_GOAL, False,
                    f"{_fig(a, 'throughput_rps', 'req/s')} vs {_fig(b, 'throughput_rps', 'req/s')} "
                    f"(c={a['concurrency']})",
                )
            )  # fmt: skip
    measured = [e for e in table if e["throughput_rps"] is not None]
    today = [e for e in measured if e["variant"] == FIXED_TEXT.name]
    if measured and today:
        best = max(measured, key=lambda e: e["throughput_rps"])
        old = max(today, key=lambda e: e["throughput_rps"])
        out.append(
            _target(
                "best variant / today's best (fixed-text, exact image), throughput",
                best["throughput_rps"], old["throughput_rps"], BEST_OVER_TODAY_GOAL, False,
                f"{best['precision']} {best['variant']} {_fig(best, 'throughput_rps', 'req/s')} "
                f"vs {old['precision']} {old['variant']} {_fig(old, 'throughput_rps', 'req/s')} "
                f"(c={best['concurrency']})",
            )
        )  # fmt: skip
    a, b = _find(table, FP32, OWN_TEXT.name), _find(table, FP32, FIXED_TEXT.name)
    if a is not None and b is not None:
        out.append(
            _target(
                f"fp32 exact: throughput, {OWN_TEXT.name} / {FIXED_TEXT.name}",
                a["throughput_rps"], b["throughput_rps"], FP32_OWN_TEXT_GOAL, False,
                f"{_fig(a, 'throughput_rps', 'req/s')} vs {_fig(b, 'throughput_rps', 'req/s')}",
            )
        )  # fmt: skip
    return out


def markdown(comparison: dict[str, Any] | None) -> list[str]:
    """results.md's "Variants" section (nothing without a comparison)."""
    if comparison is None:
        return []

    def f(v: float | None, digits: int = 2) -> str:
        return "-" if v is None else f"{v:.{digits}f}"

    ref = comparison["reference"]
    lines = [
        "",
        "## Variants",
        "",
        f"Export variants of each precision side by side ({comparison['protocol']}; throughput "
        "at the highest concurrency measured, compute per inference from Triton's batch "
        "statistics at that level: a batch's compute time over the inferences it served). "
        f"Ratios over `{ref}`. CPU: {comparison['cpu_class']} class, flags "
        f"{', '.join(comparison['cpu_flags'] or []) or 'none of the precision flags'}.",
        "",
        "| precision | variant | conc. | req/s | c=1 p50 ms | text enc. ms/inf. | preprocess "
        f"ms/inf. | req/s / {ref} | p50 / {ref} | text / {ref} | preprocess / {ref} |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in comparison["entries"]:
        x = e["over_reference"]
        lines.append(
            f"| {e['precision']} | {e['variant']} | {e['concurrency'] or '-'} "
            f"| {f(e['throughput_rps'])} | {f(e['c1_p50_ms'], 1)} | {f(e['text_compute_ms'], 3)} "
            f"| {f(e['preprocess_compute_ms'], 3)} | {f(x['throughput_rps'])} "
            f"| {f(x['c1_p50_ms'])} | {f(x['text_compute_ms'])} | {f(x['preprocess_compute_ms'])} |"
        )
    if comparison["targets"]:
        lines += ["", "| target (issue 25) | measured | goal | status | detail |"]
        lines.append("|---|---:|---|---|---|")
        for t in comparison["targets"]:
            status = {True: "met", False: "**missed**", None: "n/a"}[t["met"]]
            lines.append(
                f"| {t['target']} | {f(t['measured'], 3)} | {t['goal']} | {status} "
                f"| {t['detail']} |"
            )
    return lines
