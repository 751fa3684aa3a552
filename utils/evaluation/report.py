"""The metrics table, shared by images and volumes (one row per group, then ``mean``), and its text
views: ``metrics.md`` and the command line's summary."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pandas as pd

#: The metric columns and their headers in the markdown table, in the table's column order.
HEADERS = {
    "A_auroc": "(A) AUROC", "A_ap": "(A) AP", "B_auroc": "(B) AUROC", "B_ap": "(B) AP", "C_auroc": "(C) AUROC",
    "aupro": "AUPRO@0.3", "dice_best": "Dice best (optimistic)", "dice_val_threshold": "Dice @ val thr.",
    "field_f1": "F1 (field)", "field_detection": "detected (field)",
}
METRIC_COLUMNS = tuple(HEADERS)
TABLE_COLUMNS = ("group", "n_images", "n_rows", "small_group") + METRIC_COLUMNS + ("best_threshold", "note")
#: Groups with at most this many scoring units (images, volumes) are flagged: their numbers are noise.
SMALL_GROUP = 2
#: Rows that are not groups.
SUMMARY_ROWS = ("mean", "all")
SMALL_MARK = " †"


def with_mean_row(table: pd.DataFrame, *extra_rows: dict[str, Any]) -> pd.DataFrame:
    """``table`` (one row per group) followed by ``mean`` (the unweighted mean over the groups,
    ignoring NaN, its note naming the columns that average fewer groups; n_images/n_rows: totals)
    and ``extra_rows``."""
    counts = {column: int(table[column].notna().sum()) for column in METRIC_COLUMNS}
    fewer = [f"{column} over {count}" for column, count in counts.items() if 0 < count < len(table)]
    groups = f"{len(table)} group{'s' * (len(table) != 1)}"
    mean: dict[str, Any] = {"group": "mean", "n_images": int(table["n_images"].sum()), "n_rows": int(table["n_rows"].sum()),
                            "small_group": False, "best_threshold": float("nan"),
                            "note": f"unweighted mean over {groups}" + (f" ({', '.join(fewer)})" if fewer else "")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of an all-NaN column is NaN, as wanted
        mean |= {column: float(np.nanmean(table[column].to_numpy(dtype=np.float64))) for column in METRIC_COLUMNS}
    table = pd.concat([table, pd.DataFrame([mean, *extra_rows], columns=list(TABLE_COLUMNS))], ignore_index=True)
    return table.astype({"n_images": int, "n_rows": int, "small_group": bool})


def _fmt(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        return "–" if not math.isfinite(value) else f"{value:.3f}"
    return str(value)


def _label(row: pd.Series) -> str:
    name = str(row["group"])
    if name in SUMMARY_ROWS:
        return f"**{name}**"
    return name + SMALL_MARK if row["small_group"] else name


def _pipe_table(header: list[str], rows: list[list[str]], align: list[str]) -> list[str]:
    """The lines of a GitHub markdown table: ``header``, the alignment row (``---`` or ``---:`` per column), ``rows``."""
    return ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"] + ["| " + " | ".join(row) + " |" for row in rows]


def markdown_table(table: pd.DataFrame) -> str:
    """The metrics table as GitHub markdown (columns without any value left out); small groups marked †,
    the ``mean`` and ``all`` rows in bold."""
    columns = [c for c in HEADERS if c in table and table[c].notna().any()]
    header = ["group", "images", "rows"] + [HEADERS[c] for c in columns]
    rows = [[_label(row), str(row["n_images"]), str(row["n_rows"])] + [_fmt(row[c]) for c in columns]
            for _, row in table.iterrows()]
    return "\n".join(_pipe_table(header, rows, ["---"] + ["---:"] * (len(header) - 1)))


def markdown(run) -> str:
    """``metrics.md``: settings line, the tables, what every column means, notes."""
    ref, table, s = run.reference, run.table, run.settings
    data = f"manifest `{s.data.manifest}`" if s.data.format == "nifti" else f"data `{s.data.format}` at `{s.data.root}`"
    lines = [f"# PaDiM evaluation `{run.name}`", "",
             f"Backbone `{s.backbone}`, weights `{s.weights}`, layers {s.layers}, {s.kept_channels} channels, "
             f"{s.input_size} px input, seed {s.seed}; {data}; model {run.model_source}.",
             f"Validation threshold {ref.threshold:.4g} ({ref.percentile:g}th percentile of {ref.source}, inside the head: "
             f"{ref.region_kind}).", ""]
    if run.unit_table is not None:
        units = run.unit_table.drop(columns=["best_threshold"])
        lines += _pipe_table(list(units.columns), [[_fmt(v) for v in row] for row in units.itertuples(index=False)],
                             ["---"] * units.shape[1]) + [""]
    lines += [markdown_table(table), ""] + [f"- {note}" for note in run.units.column_notes()]
    lines.append("- † groups with 1-2 scoring units: their numbers are noise. Maps are never min-max normalised.")
    notes = [f"{row['group']}: {row['note']}" for _, row in table.iterrows()
             if row["note"] and row["group"] != "all" and not str(row["note"]).startswith(("only ", "mean over"))]
    notes += run.notes
    if notes:
        lines += ["", "Notes:"] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def summary(run) -> str:
    """Plain-text tables, notes, timings and where the results went (what ``python -m utils evaluate`` prints)."""
    table = run.table
    if table is None:
        return f"run {run.name}: not evaluated yet"
    lines = [f"run {run.name}"]
    if run.unit_table is not None:
        lines += [run.unit_table.drop(columns=["best_threshold"]).to_string(index=False, float_format="{:.3f}".format), ""]
    shown = table.drop(columns=["note", "best_threshold"]).dropna(axis=1, how="all").copy()
    shown.loc[shown["small_group"], "group"] = shown.loc[shown["small_group"], "group"] + SMALL_MARK
    lines.append(shown.drop(columns=["small_group"]).to_string(index=False, float_format="{:.3f}".format, na_rep="–"))
    lines.append("† 1-2 scoring units: noise.  dice_best is optimistic (threshold chosen on the test group or volume).")
    lines += [f"note: mean: {note}" for note in table.loc[table["group"] == "mean", "note"]]
    lines += [f"note: {n}" for n in run.notes]
    t = run.timings
    lines.append(f"fit {t.get('fit_s', 0):.1f} s, scoring {t.get('score_s', 0):.1f} s "
                 f"({t.get('units_per_second') or 0:.1f} {run.units.unit}s/s), metrics {t.get('metrics_s', 0):.1f} s")
    if run.written:
        lines.append(f"results written to {run.directory}/")
    return "\n".join(lines)
