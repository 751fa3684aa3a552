"""Text views of an evaluation's metrics table: ``metrics.md`` and the command line's summary."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

#: Column headers of the markdown table, in the table's column order.
HEADERS = {
    "A_auroc": "(A) AUROC", "A_ap": "(A) AP", "B_auroc": "(B) AUROC", "B_ap": "(B) AP", "C_auroc": "(C) AUROC",
    "aupro": "AUPRO@0.3", "dice_best": "Dice best (optimistic)", "dice_val_threshold": "Dice @ val thr.",
}
SMALL_MARK = " †"


def _fmt(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        return "–" if not math.isfinite(value) else f"{value:.3f}"
    return str(value)


def _label(row: pd.Series) -> str:
    name = str(row["group"])
    if name in ("mean", "all"):
        return f"**{name}**"
    return name + SMALL_MARK if row["small_group"] else name


def markdown_table(table: pd.DataFrame) -> str:
    """The metrics table as GitHub markdown; small groups marked †, the ``mean`` and ``all`` rows in bold."""
    columns = [c for c in HEADERS if c in table]
    headers = ["group", "images", "rows"] + [HEADERS[c] for c in columns]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|"]
    for _, row in table.iterrows():
        cells = [_label(row), str(row["n_images"]), str(row["n_rows"])] + [_fmt(row[c]) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _settings_line(evaluation, data: str) -> str:
    s = evaluation.settings
    return (f"Backbone `{s.backbone}`, weights `{s.weights}`, layers {s.layers}, {s.kept_channels} channels, "
            f"{s.input_size} px input, seed {s.seed}; {data}; model {evaluation.model_source}.")


def markdown(evaluation) -> str:
    """``metrics.md``: settings line, the table, and what every column means."""
    s, ref, table = evaluation.settings, evaluation.reference, evaluation.table
    normal = evaluation.groups.get("normal")
    lines = [
        f"# PaDiM evaluation `{evaluation.name}`",
        "",
        _settings_line(evaluation, f"data `{s.data.format}` at `{s.data.root}`"),
        f"Normal test images: {normal.n_images if normal is not None else 0}. Validation threshold {ref.threshold:.4g} "
        f"({ref.percentile:g}th percentile of {ref.source}, inside the head: {ref.region_kind}).",
        "",
        markdown_table(table),
        "",
        "- (A) pixel AUROC / average precision (scikit-learn) over all pixels of the group's rows (one per "
        "annotation), whole image. (B) the same, only pixels inside the head mask.",
        f"- (C) image AUROC: the group's distinct images against the normal test images; image score: "
        f"`{s.image_score}` of the map inside the head.",
        "- AUPRO@0.3: per-region overlap integrated up to a false-positive rate of 0.3, normalised to [0, 1], "
        "over the group's images and the normal test images.",
        "- Dice over the group's distinct images (union of boxes), inside the head. *Dice best is optimistic*: "
        "its threshold is chosen on the test group itself. Dice @ val thr. uses the validation threshold.",
        "- **mean**: unweighted mean over the groups. **all**: the whole test set pooled, every distinct image "
        "once, normal images included (the numbers MVTec AD papers report).",
        "- † groups with 1-2 images: their numbers are noise. Maps are never min-max normalised.",
    ]
    notes = [f"{row['group']}: {row['note']}" for _, row in table.iterrows()
             if row["note"] and row["group"] not in ("mean", "all") and not str(row["note"]).startswith("only ")]
    notes += evaluation.notes
    if notes:
        lines += ["", "Notes:"] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def volume_markdown(evaluation) -> str:
    """``metrics.md`` of a NIfTI evaluation: settings line, the per-volume and per-group tables, columns."""
    s, ref = evaluation.settings, evaluation.reference
    volumes = evaluation.volumes.drop(columns=["best_threshold"])
    lines = [
        f"# PaDiM evaluation `{evaluation.name}` (NIfTI volumes)",
        "",
        _settings_line(evaluation, f"manifest `{s.data.manifest}`"),
        f"Validation threshold {ref.threshold:.4g} ({ref.percentile:g}th percentile of {ref.source}, inside the brain).",
        "",
        "| " + " | ".join(volumes.columns) + " |",
        "|" + "|".join("---" for _ in volumes.columns) + "|",
    ]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in volumes.itertuples(index=False)]
    lines += [
        "", markdown_table(evaluation.table), "",
        "- A: voxel AUROC / AP over the whole volume; B: inside the brain; C: slice level (slices with lesion voxels "
        "against slices without, slice score = the map's maximum inside the brain).",
        "- Dice @ val thr.: at the validation threshold, inside the brain. *Dice best is optimistic*: its threshold "
        "is chosen on the volume itself. Group rows are means over the group's volumes; **mean** over the groups.",
    ]
    return "\n".join(lines + [f"- {n}" for n in evaluation.notes]) + "\n"


def summary(evaluation) -> str:
    """Plain-text table, notes and timings (what ``python -m utils evaluate`` prints)."""
    table = evaluation.table
    if table is None:
        return f"run {evaluation.name}: not evaluated yet"
    shown = table.drop(columns=["note", "best_threshold"]).copy()
    shown.loc[shown["small_group"], "group"] = shown.loc[shown["small_group"], "group"] + SMALL_MARK
    text = shown.drop(columns=["small_group"]).to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep="–")
    t = evaluation.timings
    lines = [f"run {evaluation.name}", text, "† 1-2 images: noise.  dice_best is optimistic (threshold chosen on the test group)."]
    lines += [f"note: {n}" for n in evaluation.notes]
    lines.append(
        f"fit {t.get('fit_s', 0):.1f} s, scoring {t.get('score_s', 0):.1f} s ({t.get('images_per_second') or 0:.1f} images/s), "
        f"metrics {t.get('metrics_s', 0):.1f} s"
    )
    if evaluation.written:
        lines.append(f"results written to {evaluation.directory}/")
    return "\n".join(lines)


def volume_summary(evaluation) -> str:
    """What ``python -m utils evaluate`` prints for NIfTI volumes: per-volume and per-group tables, notes, time."""
    number = lambda v: f"{v:.3f}"  # noqa: E731
    parts = [evaluation.volumes.to_string(index=False, float_format=number),
             evaluation.table.drop(columns=["note"]).to_string(index=False, float_format=number)]
    parts += evaluation.notes + [f"seconds per test volume: {evaluation.timings.get('seconds_per_volume')}"]
    return "\n\n".join(parts)
