"""Real inputs for the load generators (perf_analyzer, the in-process benchmark).

Every measurement sends REAL inputs: test-split images, preprocessed with
the checkpoint's record into ``pixel_values`` for the bare variants, and the
encoded image files for the ensemble (what a real client sends), never
random tensors, unless no data folder is given (then loudly synthetic).

perf_analyzer's ``--input-data`` JSON format (its docs, "Real Input Data"):
one entry per batch-1 request, ``{"data": [{"<input>": {"b64": "..."}}, ...]}``;
a batch of b takes b consecutive entries. For FP32 tensors the b64 payload
is the little-endian row-major bytes. For BYTES tensors perf_analyzer sends
the decoded b64 payload AS IS, so it must already be Triton's serialized
string tensor (4-byte little-endian length, then the bytes, per element); a
bare PNG in b64 is rejected by the server ("expected 1 string elements, got
0"), and a ``content`` string would be sent as text, not as the image bytes.
Shapes (``--shape``) come from the server's own model config
(:func:`dinov2_triton.serve.triton_access.normalise_config`), so the load matches it.
"""
from __future__ import annotations

import base64
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from dinov2_triton.core.artifact_io import atomic_write_text


@dataclass
class Samples:
    """Real inputs for the load generators: preprocessed tensors for the bare
    variants, the encoded files for the ensemble (what a real client sends)."""
    pixel_values: np.ndarray                 # float32 [N,3,H,W]
    encoded: list[bytes]                     # image files as stored (PNG/JPEG...)
    names: list[str]
    source: str                              # e.g. "test split of ./data (32 images)" or "synthetic"
    labels: list[int] | None = None
    synthetic: bool = False

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "n": len(self.names), "synthetic": self.synthetic,
                "pixel_values_shape": list(self.pixel_values.shape),
                "mean_encoded_bytes": float(np.mean([len(b) for b in self.encoded])) if self.encoded else None}


def load_samples(data_path: str | os.PathLike | None, preprocessing: Mapping[str, Any] | Any, *, n: int = 32,
                 split: str = "test", seed: int = 0) -> Samples:
    """n images of `split` (seeded choice, manifest order) from the data folder,
    preprocessed with the checkpoint's record. Without a data folder: loudly
    synthetic inputs (noise images), flagged in the report."""
    from dinov2_triton.core.preprocessing import PreprocessConfig, preprocess_source

    cfg = preprocessing if isinstance(preprocessing, PreprocessConfig) else PreprocessConfig.from_dict(preprocessing)
    if data_path is None:
        return synthetic_samples((3, cfg.image_size, cfg.image_size), n=n, seed=seed,
                                 encoded_size=cfg.resize_size)
    from dinov2_triton.data.datasets import read_manifest

    records = read_manifest(data_path, split)
    if not records and split == "test":
        records = read_manifest(data_path, "val")
        split = "val (no test split)"
    if not records:
        raise ValueError(f"{Path(data_path) / 'manifest.csv'}: no {split} images to measure with")
    rng = np.random.default_rng(seed)
    if len(records) > n:
        keep = sorted(rng.permutation(len(records))[:n].tolist())
        records = [records[i] for i in keep]
    pix = np.stack([preprocess_source(r.file(data_path), cfg, name=r.path) for r in records]).astype(np.float32)
    enc = [r.file(data_path).read_bytes() for r in records]
    return Samples(pix, enc, [r.path for r in records], f"{split} split of {data_path} ({len(records)} images)",
                   labels=[r.label for r in records])


def synthetic_samples(chw: Sequence[int], *, n: int = 16, seed: int = 0, encoded_size: int | None = None) -> Samples:
    """Random tensors and noise PNGs, for tests and for runs without data."""
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    pix = rng.standard_normal((n, *chw)).astype(np.float32)
    side = encoded_size or chw[-1]
    enc = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
        enc.append(buf.getvalue())
    return Samples(pix, enc, [f"random-{i}" for i in range(n)],
                   f"SYNTHETIC random tensors / noise images ({n}); no --data-path given", synthetic=True)


def serialize_bytes_element(data: bytes) -> bytes:
    """Triton's serialized BYTES element: uint32 little-endian length + bytes."""
    return struct.pack("<I", len(data)) + data


_NUMPY_TYPES = {"TYPE_FP32": "<f4", "TYPE_FP16": "<f2", "TYPE_FP64": "<f8", "TYPE_INT8": "i1",
                "TYPE_UINT8": "u1", "TYPE_INT32": "<i4", "TYPE_INT64": "<i8"}


def write_input_data(path: str | os.PathLike, model_config: Mapping[str, Any], samples: Samples) -> Path:
    """Write perf_analyzer's --input-data JSON for this model from real samples.

    Tensor inputs get `samples.pixel_values` (checked against the config's
    dims), BYTES inputs get the encoded images. Raises ValueError naming the
    model and input when the samples do not fit."""
    path = Path(path)
    entries: list[dict[str, Any]] = [{} for _ in range(len(samples.names))]
    name = model_config.get("name")
    for inp in model_config["input"]:
        dtype, dims = inp["data_type"], list(inp["dims"])
        if dtype in ("TYPE_STRING", "BYTES"):
            count = int(np.prod(dims)) if dims else 1
            if count != 1:
                raise ValueError(f"model {name}: BYTES input {inp['name']} has dims {dims}; only one "
                                 f"encoded image per item is supported")
            for e, img in zip(entries, samples.encoded):
                e[inp["name"]] = {"b64": base64.b64encode(serialize_bytes_element(img)).decode("ascii")}
        elif dtype in _NUMPY_TYPES:
            want = [d if d > 0 else s for d, s in zip(dims, samples.pixel_values.shape[1:])]
            if len(dims) != samples.pixel_values.ndim - 1 or list(samples.pixel_values.shape[1:]) != want:
                raise ValueError(
                    f"model {name}: input {inp['name']} expects dims {dims} but the samples are "
                    f"{list(samples.pixel_values.shape[1:])} (image size of the checkpoint's preprocessing "
                    f"record vs the served config); measure the model the checkpoint was exported from")
            arr = samples.pixel_values.astype(_NUMPY_TYPES[dtype])
            for e, a in zip(entries, arr):
                e[inp["name"]] = {"b64": base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii")}
        else:
            raise ValueError(f"model {name}: input {inp['name']} has type {dtype}, not supported here")
    return atomic_write_text(path, json.dumps({"data": entries}))


def shape_args(model_config: Mapping[str, Any], samples: Samples | None = None) -> list[str]:
    """`--shape name:dims` for every tensor input, from the server's config
    (variable dims filled from the samples), so the load matches the config."""
    args = []
    for inp in model_config["input"]:
        dims = list(inp["dims"])
        if inp["data_type"] in ("TYPE_STRING", "BYTES"):
            dims = [d if d > 0 else 1 for d in dims]
        elif any(d < 0 for d in dims):
            if samples is None:
                raise ValueError(f"model {model_config.get('name')}: input {inp['name']} has variable dims "
                                 f"{dims}; give samples to fill them")
            dims = [d if d > 0 else s for d, s in zip(dims, samples.pixel_values.shape[1:])]
        args.append(f"--shape={inp['name']}:{','.join(str(d) for d in dims)}")
    return args


def bytes_per_item(model_config: Mapping[str, Any], samples: Samples | None = None) -> dict[str, float]:
    """Bytes on the wire per image: inputs (tensors or the encoded file) and outputs."""
    size = {"TYPE_FP32": 4, "TYPE_FP16": 2, "TYPE_FP64": 8, "TYPE_INT8": 1, "TYPE_UINT8": 1,
            "TYPE_INT32": 4, "TYPE_INT64": 8}
    def total(entries, is_input):
        n = 0.0
        for e in entries:
            if e["data_type"] in ("TYPE_STRING", "BYTES"):
                if is_input and samples is not None and samples.encoded:
                    n += float(np.mean([len(b) + 4 for b in samples.encoded]))
                continue
            n += size.get(e["data_type"], 4) * float(np.prod([max(d, 1) for d in e["dims"]]))
        return n
    return {"input_bytes": total(model_config["input"], True), "output_bytes": total(model_config["output"], False)}
