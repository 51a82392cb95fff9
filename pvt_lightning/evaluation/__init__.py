"""After training: per-class metrics, calibration, operating points, plots and the evaluation report."""
