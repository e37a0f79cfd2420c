"""Models-from-code entry point of an exported TopoCAM model (``mlflow.pyfunc.log_model(python_model=<this file>)``).

MLflow copies this file into the model and runs it when the model is loaded;
the bundle comes in as the ``bundle`` artifact (``TopoCAMModel.load_context``).
"""

import mlflow

from topocam.deploy.pyfunc import TopoCAMModel

mlflow.models.set_model(TopoCAMModel())
