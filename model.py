"""The model definition, importable from the repository root (``import model``).

Re-exports the one model factory of the train stage (train/model.py)."""
from dinov2_triton.train.model import DinoV2Classifier, build_model, load_classifier, resolve_arch

__all__ = ["DinoV2Classifier", "build_model", "load_classifier", "resolve_arch"]
