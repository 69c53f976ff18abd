"""CSV files people open in a spreadsheet: no cell of a manifest's text runs as a formula.

A study id, a label name, a failure's reason or a reviewer's text that starts with `=`, `+`,
`-`, `@`, a tab or a carriage return is a formula to Excel and its kin (`=HYPERLINK(...)`
sends neighbouring cells away when clicked), so such text cells and column names get a
leading apostrophe, as OWASP advises. Numbers are written as they are; the Parquet files and
the reviewed manifest, which programs read back, are not changed.
"""

from __future__ import annotations

import pandas as pd

FORMULA = r"^[=+\-@\t\r]"


def formula_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy of `frame` whose text cells and column names cannot start a formula."""
    safe = frame.copy()
    for column in safe.columns:
        values = safe[column]
        if pd.api.types.is_object_dtype(values) or pd.api.types.is_string_dtype(values):
            text = values.astype("string")
            risky = text.str.contains(FORMULA, regex=True, na=False)
            safe[column] = values.where(~risky, "'" + text)
    safe.columns = [
        f"'{name}" if pd.Series([str(name)]).str.contains(FORMULA).iloc[0] else name
        for name in safe.columns
    ]
    return safe
