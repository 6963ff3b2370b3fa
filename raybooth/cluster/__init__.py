"""What every job stands on: typed config, the Ray runtime, storage URIs and MLflow tracking."""
