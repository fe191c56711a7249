"""Triton Python-backend model `dinov2_preprocess`: encoded image bytes ->
pixel_values FP32 [N,3,H,W], exactly as training preprocessed its images.

Copied by `python -m export` into `<repo>/dinov2_preprocess/<version>/model.py`
together with:
- `dinov2_images.py` (a copy of train/images.py: open_rgb, EXIF + any mode -> RGB),
- `dinov2_preprocessing.py` (a copy of train/preprocessing.py: preprocess_pil),
- `dinov2_image_limits.py` (a copy of train/image_limits.py: check_image_limits),
- `preprocessing.json` (the record stored in the checkpoint that was exported).
The version folder is self-contained: the NVIDIA Triton container does not
have this project installed; it only needs numpy and Pillow (see
model_repository/README.md for the derived image).

Every request is answered on its own: an undecodable image fails its request
with a message naming the image's index, and the other requests of the same
dynamic batch still succeed.

Hostile images are refused before they are decoded: more encoded bytes than
the `max_image_bytes` parameter of config.pbtxt, or a header declaring more
pixels than `max_image_pixels` (defaults: train/image_limits.py), fails the
request in about a millisecond with a message naming the image and the limit.
A decompression bomb (a small PNG declaring 20000 x 20000 pixels) therefore
costs neither seconds of CPU nor gigabytes of memory.
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


images = _load_helper("dinov2_images.py", "dinov2_triton.core.images")
preprocessing = _load_helper("dinov2_preprocessing.py", "dinov2_triton.core.preprocessing")
image_limits = _load_helper("dinov2_image_limits.py", "dinov2_triton.core.image_limits")
LIMIT_DEFAULTS = {"max_image_bytes": image_limits.DEFAULT_MAX_IMAGE_BYTES,
                  "max_image_pixels": image_limits.DEFAULT_MAX_IMAGE_PIXELS}


class ImageError(ValueError):
    """One image of a request could not be used; the message names it."""


def load_record(folder=HERE):
    """The PreprocessConfig stored beside this file."""
    path = os.path.join(folder, RECORD_FILE)
    with open(path, encoding="utf-8") as fh:
        return preprocessing.PreprocessConfig.from_dict(json.load(fh))


def read_limits(config):
    """{"max_image_bytes": int, "max_image_pixels": int} from the model config's
    parameters (the defaults where a parameter is absent); a bad value raises
    ValueError naming the parameter."""
    params = config.get("parameters") or {}
    limits = {}
    for key, default in LIMIT_DEFAULTS.items():
        raw = (params.get(key) or {}).get("string_value", default)
        try:
            value = int(raw)
        except (TypeError, ValueError):
            raise ValueError(f"config.pbtxt parameter {key}: {raw!r} is not an integer") from None
        if value < 1:
            raise ValueError(f"config.pbtxt parameter {key}: {value} must be >= 1")
        limits[key] = value
    return limits


def _as_bytes(element):
    if isinstance(element, (bytes, bytearray, memoryview)):
        return bytes(element)
    if isinstance(element, np.ndarray) and element.dtype == np.uint8:
        return element.tobytes()
    if isinstance(element, str):  # a client that sent text: cannot be an image
        return element.encode("utf-8", "surrogateescape")
    return bytes(element)


def preprocess_images(batch, cfg, limits=None):
    """A request's `image` tensor (object array [n,1] or [n] of encoded
    bytes) -> float32 [n,3,H,W]. Raises ImageError for the first bad image.
    ``limits``: read_limits() of the config (None: the defaults). Every image
    is checked against them before any is decoded, so a bomb at the end of
    a batch costs nothing either."""
    limits = dict(LIMIT_DEFAULTS if limits is None else limits)
    flat = np.asarray(batch, dtype=object).reshape(-1)
    blobs = [_as_bytes(element) for element in flat]
    for i, data in enumerate(blobs):
        try:
            image_limits.check_image_limits(data, max_bytes=limits["max_image_bytes"],
                                            max_pixels=limits["max_image_pixels"],
                                            name=f"image {i} of request")
        except image_limits.ImageLimitError as exc:
            raise ImageError(f"{exc}; refused before decoding") from None
    out = np.empty((len(flat), 3, cfg.image_size, cfg.image_size), dtype=np.float32)
    for i, data in enumerate(blobs):
        label = f"image {i} of request"
        try:
            img = images.open_rgb(data, name=label)
            out[i] = preprocessing.preprocess_pil(img, cfg)
        except images.ImageDecodeError as exc:
            raise ImageError(str(exc)) from exc
        except Exception as exc:  # noqa: BLE001 - any failure belongs to this image
            raise ImageError(f"{label}: cannot be preprocessed ({type(exc).__name__}: {exc})") from exc
    return out


def execute_requests(requests, cfg, utils, limits=None):
    """One response per request; a bad request gets an error response."""
    responses = []
    for request in requests:
        try:
            tensor = utils.get_input_tensor_by_name(request, INPUT_NAME)
            if tensor is None:
                raise ImageError(f"request has no '{INPUT_NAME}' input")
            pixels = preprocess_images(tensor.as_numpy(), cfg, limits)
            responses.append(utils.InferenceResponse(output_tensors=[utils.Tensor(OUTPUT_NAME, pixels)]))
        except ImageError as exc:
            responses.append(utils.InferenceResponse(output_tensors=[], error=_client_error(utils, str(exc))))
    return responses


def _client_error(utils, message):
    """A TritonError with code INVALID_ARG (HTTP 400, gRPC INVALID_ARGUMENT): a
    bad image is the client's mistake, not a server failure (the default
    code, INTERNAL, would answer HTTP 500). Python backends older than
    23.xx have no codes: the message alone then."""
    code = getattr(utils.TritonError, "INVALID_ARG", None)
    return utils.TritonError(message) if code is None else utils.TritonError(message, code)


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
        try:
            self.limits = read_limits(config)
        except ValueError as exc:
            raise pb_utils.TritonModelException(str(exc)) from None
        dims = [int(d) for d in outputs[OUTPUT_NAME]["dims"]]
        if dims != [3, self.cfg.image_size, self.cfg.image_size]:
            raise pb_utils.TritonModelException(
                f"output dims {dims} do not match {RECORD_FILE} image_size {self.cfg.image_size}")

    def execute(self, requests):
        return execute_requests(requests, self.cfg, pb_utils, self.limits)

    def finalize(self):
        pass
