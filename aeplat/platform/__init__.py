"""The platform: command line, search orchestration with Ray Tune, MLflow tracking and registry."""
