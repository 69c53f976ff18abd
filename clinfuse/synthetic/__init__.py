"""A deterministic synthetic hospital export: chest radiographs (DICOM), notes and labels.

`make_sample_data` writes the export every quality bar and benchmark in clinfuse is measured
on; its README says what each label depends on and what is deliberately hard.
"""

from clinfuse.synthetic.cohort import LABELS
from clinfuse.synthetic.export import SampleDataSummary, make_sample_data

__all__ = ["LABELS", "SampleDataSummary", "make_sample_data"]
