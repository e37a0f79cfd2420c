"""The method, stage by stage: data -> backbone -> cam -> roi -> topology -> classifier,
composed by pipeline. Nothing here imports Optuna, MLflow, Typer or the packages
that wrap the core (search, tracking, deploy, report, cli): tests/test_layers.py
enforces it."""
