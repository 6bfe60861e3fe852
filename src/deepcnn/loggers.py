"""Loggers that need more than their Lightning class: MLflow with a local SQLite store."""
from __future__ import annotations

import os


def mlflow(experiment_name: str, run_name: str, tracking_uri: str):
    """Lightning's MLFlowLogger, with MLflow's telemetry off; the SQLite store's folder is created."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    from pytorch_lightning.loggers import MLFlowLogger

    if tracking_uri.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(tracking_uri.removeprefix("sqlite:///")) or ".", exist_ok=True)
    return MLFlowLogger(experiment_name=experiment_name, run_name=run_name, tracking_uri=tracking_uri)
