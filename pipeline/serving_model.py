"""The code of every logged engagement model (MLflow's "models from code"): MLflow copies this
file into the model and runs it on load, so nothing is pickled; what differs between models is
their bundle artifact, which `EngagementPyfunc.load_context` reads (pipeline/serving.py)."""

import mlflow

from pipeline.serving import EngagementPyfunc

mlflow.models.set_model(EngagementPyfunc())
