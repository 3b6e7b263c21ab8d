"""Calibration: sample text (data.py) and the sequential block-by-block pipeline (pipeline.py)."""

from .data import calibration_samples, calibration_texts
from .pipeline import CALIB_DEFAULTS, block_output, clear_checkpoint, quantize_calibrated

__all__ = ["CALIB_DEFAULTS", "block_output", "calibration_samples", "calibration_texts", "clear_checkpoint",
           "quantize_calibrated"]
