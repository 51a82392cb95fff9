"""Data audit: exact and near-duplicate images (train/val/test leakage) and label-issue candidates.

Input is a list of ``Record(path, label, split)`` (``records_from_folder`` reads an ImageFolder root);
``run_audit`` embeds every image with a trained model and returns the report and its files.
"""

from pvt_lightning.audit.audit import AuditSettings, run_audit
from pvt_lightning.audit.records import Record, records_from_folder

__all__ = ["AuditSettings", "Record", "records_from_folder", "run_audit"]
