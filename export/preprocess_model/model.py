"""Triton Python-backend model `dinov2_preprocess`: encoded image bytes ->
pixel_values FP32 [N,3,H,W], exactly as training preprocessed its images.

Copied by `python -m export` into `<repo>/dinov2_preprocess/<version>/model.py`
together with:
- `dinov2_images.py` (a copy of train/images.py: open_rgb, EXIF + any mode -> RGB),
- `dinov2_preprocessing.py` (a copy of train/preprocessing.py: preprocess_pil),
- `preprocessing.json` (the record stored in the checkpoint that was exported).
The version folder is self-contained: the NVIDIA Triton container does not
have this project installed; it only needs numpy and Pillow (see
model_repository/README.md for the derived image).

Every request is answered on its own: an undecodable image fails its request
with a message naming the image's index, and the other requests of the same
dynamic batch still succeed.
"""
import importlib
import importlib.util
import json
import os
import sys

import numpy as np

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported outside Triton (unit tests use the helpers below)
    pb_utils = None

HERE = os.path.dirname(os.path.abspath(__file__))
RECORD_FILE = "preprocessing.json"
INPUT_NAME = "image"
OUTPUT_NAME = "pixel_values"


def _load_helper(filename, fallback):
    """Import the helper copied beside this file; in the source tree (tests)
    fall back to the project module it was copied from."""
    path = os.path.join(HERE, filename)
    name = filename[:-3]
    if os.path.isfile(path):
        if name in sys.modules and getattr(sys.modules[name], "__file__", None) == path:
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up here
        spec.loader.exec_module(module)
        return module
    return importlib.import_module(fallback)


images = _load_helper("dinov2_images.py", "train.images")
preprocessing = _load_helper("dinov2_preprocessing.py", "train.preprocessing")


class ImageError(ValueError):
    """One image of a request could not be used; the message names it."""


def load_record(folder=HERE):
    """The PreprocessConfig stored beside this file."""
    path = os.path.join(folder, RECORD_FILE)
    with open(path, encoding="utf-8") as fh:
        return preprocessing.PreprocessConfig.from_dict(json.load(fh))


def _as_bytes(element):
    if isinstance(element, (bytes, bytearray, memoryview)):
        return bytes(element)
    if isinstance(element, np.ndarray) and element.dtype == np.uint8:
        return element.tobytes()
    if isinstance(element, str):  # a client that sent text: cannot be an image
        return element.encode("utf-8", "surrogateescape")
    return bytes(element)


def preprocess_images(batch, cfg):
    """A request's `image` tensor (object array [n,1] or [n] of encoded
    bytes) -> float32 [n,3,H,W]. Raises ImageError for the first bad image."""
    flat = np.asarray(batch, dtype=object).reshape(-1)
    out = np.empty((len(flat), 3, cfg.image_size, cfg.image_size), dtype=np.float32)
    for i, element in enumerate(flat):
        label = f"image {i} of request"
        try:
            img = images.open_rgb(_as_bytes(element), name=label)
            out[i] = preprocessing.preprocess_pil(img, cfg)
        except images.ImageDecodeError as exc:
            raise ImageError(str(exc)) from exc
        except Exception as exc:  # noqa: BLE001 - any failure belongs to this image
            raise ImageError(f"{label}: cannot be preprocessed ({type(exc).__name__}: {exc})") from exc
    return out


def execute_requests(requests, cfg, utils):
    """One response per request; a bad request gets an error response."""
    responses = []
    for request in requests:
        try:
            tensor = utils.get_input_tensor_by_name(request, INPUT_NAME)
            if tensor is None:
                raise ImageError(f"request has no '{INPUT_NAME}' input")
            pixels = preprocess_images(tensor.as_numpy(), cfg)
            responses.append(utils.InferenceResponse(output_tensors=[utils.Tensor(OUTPUT_NAME, pixels)]))
        except ImageError as exc:
            responses.append(utils.InferenceResponse(output_tensors=[], error=utils.TritonError(str(exc))))
    return responses


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        inputs = {t["name"]: t for t in config.get("input", [])}
        outputs = {t["name"]: t for t in config.get("output", [])}
        if INPUT_NAME not in inputs or inputs[INPUT_NAME]["data_type"] != "TYPE_STRING":
            raise pb_utils.TritonModelException(f"config needs input '{INPUT_NAME}' TYPE_STRING")
        if OUTPUT_NAME not in outputs or outputs[OUTPUT_NAME]["data_type"] != "TYPE_FP32":
            raise pb_utils.TritonModelException(f"config needs output '{OUTPUT_NAME}' TYPE_FP32")
        self.cfg = load_record()
        dims = [int(d) for d in outputs[OUTPUT_NAME]["dims"]]
        if dims != [3, self.cfg.image_size, self.cfg.image_size]:
            raise pb_utils.TritonModelException(
                f"output dims {dims} do not match {RECORD_FILE} image_size {self.cfg.image_size}")

    def execute(self, requests):
        return execute_requests(requests, self.cfg, pb_utils)

    def finalize(self):
        pass
