"""MLflow "model from code" of the medsynth generator (copied into each logged model; no pickled objects)."""

from mlflow.models import set_model

from medsynth.tracking.pyfunc import GeneratorModel

set_model(GeneratorModel())
