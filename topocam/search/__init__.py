"""Search strategies (Optuna samplers) used by the TopoCAM studies."""
