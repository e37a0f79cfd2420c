"""Shipping the best configuration: an MLflow pyfunc model, serving, prediction on
image files and a small web page.

    bundle.py     the fitted chain (backbone, CAM settings, Betti grid, MLP) on disk
    inputs.py     what an exported model accepts: array validation and conversion
    files.py      PNG / JPEG / NPY / NIfTI files -> arrays at the model's size
    overlay.py    fused CAM heat map with the ROI contour, as a PNG
    pyfunc.py     the MLflow ``PythonModel`` (``model_code.py`` is its models-from-code entry)
    export.py     best trial -> refit -> logged, registered model with alias ``champion``
    predict.py    ``topocam predict``: files -> predictions.jsonl + overlays
    serve.py      model URIs, the tracking store, ``mlflow models serve`` with a working PATH
    app.py        ``topocam app``: upload an image, see the class, CAM and ROI

Unlike the core (data .. pipeline), this package uses MLflow (and export.py Optuna).
"""
