"""Subgroup analysis of prediction files: who do the models get wrong, and do they agree?

    python -m cxr_fast.analyze --pred-dir all_pred --out reports/NAME

Library use (every function takes keyword arguments and returns a DataFrame, except the two
top-level calls):

    predictions = load_predictions(pred_dir="all_pred", split="test")
    model_table(predictions=predictions)        # per model: metric, value, CI
    subgroup_table(predictions=predictions)     # per model x group: value, gaps, CIs, p, q, flag
    calibration_table(predictions=predictions)  # per model x group: citl, slope, intercept, ECE, gaps, flags
    consistency_table(predictions=predictions)  # per task x group: pairwise and mean kappa
    systematic_table(predictions=predictions)   # who is over-represented among systematic errors
    systematic_images(predictions=predictions)  # the images most models get wrong
    analysis = analyze(pred_dir="all_pred")     # all of the above -> Analysis
    write_report(analysis=analysis, out="reports/x")  # -> path of index.html
"""

from cxr_fast.analyze.calibration import calibration_table
from cxr_fast.analyze.consistency import consistency_table, error_consistency
from cxr_fast.analyze.inputs import load_predictions
from cxr_fast.analyze.performance import model_table, subgroup_table
from cxr_fast.analyze.pipeline import Analysis, Settings, analyze
from cxr_fast.analyze.report import write_report
from cxr_fast.analyze.systematic import systematic_images, systematic_table
from cxr_fast.metrics import binary_metrics

__all__ = [
    "Analysis", "Settings", "analyze", "binary_metrics", "calibration_table", "consistency_table", "error_consistency",
    "load_predictions", "model_table", "subgroup_table", "systematic_images", "systematic_table", "write_report",
]
