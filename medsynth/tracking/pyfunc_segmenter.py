"""MLflow "model from code" of the medsynth reference segmenter (copied into each logged model; no pickle)."""

from mlflow.models import set_model

from medsynth.tracking.pyfunc import SegmenterModel

set_model(SegmenterModel())
