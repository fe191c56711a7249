"""The seed's ``model.py``: the model definition, importable from the checkout root (``import model``).

Re-exports the one model factory (``dinov2_triton.train.model``):
DinoV2Classifier, build_model, load_classifier, resolve_arch.

This file must never stand in for another ``model`` module. Triton's Python
backend stub loads a Python-based backend (our onnxruntime / pytorch /
openvino stand-ins) with ``sys.path.append(<backend folder>); import model``;
a tritonserver whose working directory is this checkout (Triton Model
Analyzer's local launch does that) finds this file first, through the
stub's ``''`` entry. So when it is imported inside a stub (the Python
backend's ``triton_python_backend_utils`` is on ``sys.path``), it loads the
first other ``model.py`` on ``sys.path``, the backend's own, and becomes that
module. Standard library only until the factory is imported.
"""
import sys
from importlib.util import find_spec


def _become_the_backends_model() -> None:
    """Replace this module in ``sys.modules`` with the next ``model.py`` on sys.path."""
    import importlib.util
    import os

    here = os.path.realpath(__file__)
    for entry in sys.path:
        candidate = os.path.join(entry or os.getcwd(), "model.py")
        if not os.path.isfile(candidate) or os.path.realpath(candidate) == here:
            continue
        spec = importlib.util.spec_from_file_location(__name__, candidate)
        module = importlib.util.module_from_spec(spec)
        sys.modules[__name__] = module  # `import model` returns what sys.modules holds after this file ran
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(__name__, None)
            raise
        return
    raise ImportError(f"{here} was imported as a Triton Python backend's 'model' module (the server was "
                      "started with the dinov2-triton checkout as its working directory) and there is no "
                      f"other model.py on sys.path to hand the import on to: {sys.path}")


if __name__ == "model" and find_spec("triton_python_backend_utils") is not None:
    _become_the_backends_model()
else:
    from dinov2_triton.train.model import DinoV2Classifier, build_model, load_classifier, resolve_arch

    __all__ = ["DinoV2Classifier", "build_model", "load_classifier", "resolve_arch"]
