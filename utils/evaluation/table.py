"""The metrics table's shape, shared by images and volumes: one row per group, then ``mean``."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pandas as pd

#: Groups with at most this many scoring units (images, volumes) are flagged: their numbers are noise.
SMALL_GROUP = 2
METRIC_COLUMNS = ("A_auroc", "A_ap", "B_auroc", "B_ap", "C_auroc", "aupro", "dice_best", "dice_val_threshold",
                  "field_f1", "field_detection")
TABLE_COLUMNS = ("group", "n_images", "n_rows", "small_group") + METRIC_COLUMNS + ("best_threshold", "note")
#: Rows that are not groups.
SUMMARY_ROWS = ("mean", "all")


def with_mean_row(table: pd.DataFrame, *extra_rows: dict[str, Any]) -> pd.DataFrame:
    """``table`` (one row per group) followed by ``mean`` (the unweighted mean over the groups,
    ignoring NaN, its note naming the columns that average fewer groups; n_images/n_rows: totals)
    and ``extra_rows``."""
    counts = {column: int(table[column].notna().sum()) for column in METRIC_COLUMNS}
    fewer = [f"{column} over {count}" for column, count in counts.items() if 0 < count < len(table)]
    mean: dict[str, Any] = {"group": "mean", "n_images": int(table["n_images"].sum()), "n_rows": int(table["n_rows"].sum()),
                            "small_group": False, "best_threshold": float("nan"),
                            "note": f"unweighted mean over {len(table)} groups" + (f" ({', '.join(fewer)})" if fewer else "")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of an all-NaN column is NaN, as wanted
        mean |= {column: float(np.nanmean(table[column].to_numpy(dtype=np.float64))) for column in METRIC_COLUMNS}
    table = pd.concat([table, pd.DataFrame([mean, *extra_rows], columns=list(TABLE_COLUMNS))], ignore_index=True)
    return table.astype({"n_images": int, "n_rows": int, "small_group": bool})
