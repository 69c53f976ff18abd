"""CSV files people open in a spreadsheet never run a manifest's text as a formula."""

import pandas as pd

from clinfuse.spreadsheet import formula_safe


def test_text_that_would_start_a_formula_gets_an_apostrophe_and_numbers_do_not():
    frame = pd.DataFrame(
        {
            "study_id": ['=HYPERLINK("http://x","click")', "+cmd", "-2", "@SUM(A1)", "\t=1", "S1"],
            "=flu": [0.1, -0.5, 0.3, 0.4, 0.5, 0.6],  # a label named to run: its header too
            "reason": [None, "image:missing", "", "x", "y", "z"],
        }
    )
    safe = formula_safe(frame)
    assert safe["study_id"].tolist() == [
        '\'=HYPERLINK("http://x","click")',
        "'+cmd",
        "'-2",
        "'@SUM(A1)",
        "'\t=1",
        "S1",
    ]
    assert list(safe.columns) == ["study_id", "'=flu", "reason"]
    assert safe["'=flu"].tolist() == frame["=flu"].tolist()  # numbers as they are, -0.5 too
    assert safe["reason"].isna().iloc[0] and safe["reason"].iloc[1] == "image:missing"
    assert frame["study_id"].iloc[0].startswith("=")  # the caller's frame is not changed
