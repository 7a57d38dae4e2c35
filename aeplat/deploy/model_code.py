"""Model code file of the aeplat scoring model: MLflow runs it to create the pyfunc model when loading.

Logging a model from this file, in place of a pickled PythonModel object, keeps pickle out of
the model files.
"""

from mlflow.models import set_model

from aeplat.deploy.pyfunc import AnomalyScoringModel

set_model(AnomalyScoringModel())
