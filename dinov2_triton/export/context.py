"""What a variant builder gets: the eager model, its record, the data and the
already built artifacts, plus the evaluation helpers every variant shares.

Calibration images come ONLY from the data folder's train split and are
preprocessed with the checkpoint's stored record, so INT8 calibration never
sees a held-out image. Evaluation uses the test split (val as a fallback)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from dinov2_triton.export.registry import Runner, SkipVariant

if TYPE_CHECKING:
    from dinov2_triton.core.preprocessing import PreprocessConfig
    from dinov2_triton.train.checkpoint import CheckpointRecord
    from dinov2_triton.train.model import DinoV2Classifier

log = logging.getLogger(__name__)

DEFAULT_EVAL_SIZE = 256
SYNTHETIC_EVAL_SIZE = 16


class DataUnavailable(ValueError):
    """The data folder cannot provide what was asked (e.g. no train split)."""


@dataclass
class EvalSet:
    pixel_values: np.ndarray           # float32 [N,3,H,W], preprocessed with the stored record
    labels: np.ndarray | None          # int64 [N]; None for synthetic inputs
    names: list[str]                   # manifest paths (or "random-<i>")
    split: str                         # "test", "val" or "random"
    synthetic: bool = False
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.pixel_values)

    def describe(self) -> dict[str, Any]:
        return {"split": self.split, "n": len(self), "synthetic": self.synthetic,
                "labelled": self.labels is not None, "notes": list(self.notes)}


def run_batched(runner: Runner, x: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Run `runner` over x in batches of at most batch_size; concatenated outputs."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    logits, embs = [], []
    for i in range(0, len(x), batch_size):
        lo, em = runner(np.ascontiguousarray(x[i:i + batch_size], dtype=np.float32))
        lo, em = np.asarray(lo), np.asarray(em)
        n = min(batch_size, len(x) - i)
        if lo.shape[0] != n or em.shape[0] != n:
            raise ValueError(f"runner returned batch {lo.shape[0]}/{em.shape[0]} for an input batch of {n}")
        logits.append(lo.astype(np.float32, copy=False))
        embs.append(em.astype(np.float32, copy=False))
    return np.concatenate(logits), np.concatenate(embs)


def eager_runner(model) -> Runner:
    """The eager FP32 reference as a runner (no autograd)."""
    import torch

    def run(x: np.ndarray):
        with torch.inference_mode():
            lo, em = model.forward_with_embedding(torch.from_numpy(np.ascontiguousarray(x)))
        return lo.numpy(), em.numpy()
    return run


def export_module(model):
    """Wrap a DinoV2Classifier so its forward returns (logits, embedding)."""
    from torch import nn

    class DinoV2Export(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.model = inner

        def forward(self, pixel_values):
            logits, embedding = self.model.forward_with_embedding(pixel_values)
            return logits, embedding

    return DinoV2Export(model).eval()


class ExportContext:
    """Shared state of one export run, handed to every `Variant.build`.

    Attributes: model (eager FP32 DinoV2Classifier, eval, CPU), record (the
    dinov2_triton.train.checkpoint.CheckpointRecord), preprocessing (its PreprocessConfig),
    data_path, work_dir (scratch, deleted after the run), artifacts
    (variant name -> published artifact file), options (all CLI options).
    """

    def __init__(self, model: "DinoV2Classifier", record: "CheckpointRecord", *,
                 data_path: str | Path | None, work_dir: str | Path,
                 options: Mapping[str, Any] | None = None) -> None:
        self.model = model
        self.record = record
        self.preprocessing: "PreprocessConfig" = record.preprocessing
        self.data_path = Path(data_path) if data_path is not None else None
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.artifacts: dict[str, Path] = {}
        self.options: dict[str, Any] = dict(options or {})
        # Which files calibration_images() read (manifest paths and split), so
        # the manifest and the tests can check no held-out image was used.
        self.calibration_files: list[str] = []
        self.calibration_splits: set[str] = set()
        # Cached per purpose: "verify" uses the test split (val as fallback);
        # "search" (choosing a quantization config) uses val, so the numbers
        # the verification reports come from images the search never saw.
        self._eval_sets: dict[str, EvalSet] = {}
        self._references: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._records = None
        self.data_summary = None   # dinov2_triton.data.folder.DataSummary, read with the manifest

    # -- shape facts ------------------------------------------------------
    @property
    def image_size(self) -> int:
        return self.record.image_size

    @property
    def num_classes(self) -> int:
        return self.record.num_classes

    @property
    def class_names(self) -> list[str]:
        return list(self.record.class_names)

    @property
    def embed_dim(self) -> int:
        return int(self.model.embed_dim)

    @property
    def max_batch_size(self) -> int:
        return int(self.options.get("max_batch_size", 8))

    def input_shape(self, batch: int) -> tuple[int, int, int, int]:
        return (batch, 3, self.image_size, self.image_size)

    def export_module(self):
        """The module every exporter traces: forward(pixel_values) ->
        (logits, embedding), the serving contract's output order."""
        return export_module(self.model)

    def example_input(self, batch: int = 2, seed: int = 0):
        """A random FP32 torch tensor [batch,3,H,W] for tracing. Batch 2 by
        default: exporters specialise a batch of 1 into the graph."""
        import torch

        g = torch.Generator().manual_seed(seed)
        return torch.randn(self.input_shape(batch), generator=g)

    # -- data ---------------------------------------------------------------
    def _manifest(self):
        if self._records is None:
            from dinov2_triton.core.records import RecordError
            from dinov2_triton.data.datasets import read_labels, read_manifest
            from dinov2_triton.data.folder import read_summary

            if self.data_path is None:
                raise DataUnavailable("no --data-path given")
            labels = read_labels(self.data_path)
            try:  # the data stage's record: the folder is one dinov2_triton.data.load wrote, whole
                self.data_summary = read_summary(self.data_path)
            except RecordError as exc:
                raise DataUnavailable(str(exc)) from None
            if self.data_summary.classes != labels:
                raise DataUnavailable(f"{self.data_path / 'summary.json'} lists classes {self.data_summary.classes}, "
                                      f"labels.txt {labels}: the data folder is inconsistent; rerun dinov2-triton data")
            if labels != self.class_names:
                raise DataUnavailable(
                    f"{self.data_path / 'labels.txt'} lists classes {labels}, but the checkpoint "
                    f"was trained on {self.class_names}; pass the data folder the model was trained on")
            self._records = read_manifest(self.data_path)
        return self._records

    def _load(self, records) -> np.ndarray:
        from dinov2_triton.core.preprocessing import preprocess_source

        out = np.empty((len(records),) + self.input_shape(1)[1:], dtype=np.float32)
        for i, r in enumerate(records):
            out[i] = preprocess_source(r.file(self.data_path), self.preprocessing, name=r.path)
        return out

    def calibration_images(self, n: int, seed: int = 0) -> np.ndarray:
        """n preprocessed images (float32 [n,3,H,W]) drawn at random (seeded)
        from the TRAIN split only. Fewer when the split is smaller (warned).
        Raises SkipVariant when there is no data folder to calibrate on."""
        if self.data_path is None:
            raise SkipVariant("not built: calibration needs real training images; pass --data-path")
        train = [r for r in self._manifest() if r.split == "train"]
        if not train:
            raise SkipVariant(f"not built: {self.data_path / 'manifest.csv'} has no train split to "
                              f"calibrate on")
        if n < 1:
            raise ValueError(f"calibration size {n}: must be >= 1")
        if n > len(train):
            log.warning("calibration: asked for %d images, the train split has %d; using all of them",
                        n, len(train))
        rng = np.random.default_rng(seed)
        picked = [train[i] for i in sorted(rng.permutation(len(train))[:n].tolist())]
        self.calibration_files.extend(r.path for r in picked)
        self.calibration_splits.update(r.split for r in picked)
        return self._load(picked)

    def eval_set(self, purpose: str = "verify") -> EvalSet:
        """The held-out images every variant is verified on (cached): the test
        split, else val (warned); random tensors (loudly warned, no label
        metrics) when there is no data folder. At most options['eval_size']
        images, chosen with a fixed seed and kept in manifest order.
        purpose="search": the val split (test as fallback), for choosing
        between configurations without touching the verification images."""
        if purpose not in ("verify", "search"):
            raise ValueError(f"eval_set purpose {purpose!r}: 'verify' or 'search'")
        if purpose not in self._eval_sets:
            order = ("test", "val") if purpose == "verify" else ("val", "test")
            self._eval_sets[purpose] = self._make_eval_set(order)
        return self._eval_sets[purpose]

    def _make_eval_set(self, order: tuple[str, str] = ("test", "val")) -> EvalSet:
        limit = int(self.options.get("eval_size") or DEFAULT_EVAL_SIZE)
        if self.data_path is None:
            n = min(limit, SYNTHETIC_EVAL_SIZE)
            msg = (f"NO --data-path: verifying on {n} RANDOM tensors. Tensor parity is checked, "
                   f"but no accuracy is measured and random inputs do not look like images; "
                   f"pass --data-path for a real verification")
            log.warning(msg)
            rng = np.random.default_rng(0)
            x = rng.standard_normal(self.input_shape(n)).astype(np.float32)
            return EvalSet(x, None, [f"random-{i}" for i in range(n)], "random", True, [msg])
        records = self._manifest()
        notes = []
        split = order[0]
        chosen = [r for r in records if r.split == split]
        if not chosen:
            split = order[1]
            chosen = [r for r in records if r.split == split]
            msg = (f"{self.data_path / 'manifest.csv'} has no {order[0]} split; using the {split} split "
                   f"instead" + (" (it may have guided training choices)" if split == "val" else ""))
            log.warning(msg)
            notes.append(msg)
        if not chosen:
            raise DataUnavailable(f"{self.data_path / 'manifest.csv'}: no test or val images to evaluate on")
        if len(chosen) > limit:
            rng = np.random.default_rng(0)
            keep = sorted(rng.permutation(len(chosen))[:limit].tolist())
            notes.append(f"{limit} of {len(chosen)} {split} images (seeded subset; --eval-size)")
            chosen = [chosen[i] for i in keep]
        x = self._load(chosen)
        labels = np.asarray([r.label for r in chosen], dtype=np.int64)
        return EvalSet(x, labels, [r.path for r in chosen], split, False, notes)

    # -- reference and evaluation ----------------------------------------------
    def reference_outputs(self, purpose: str = "verify") -> tuple[np.ndarray, np.ndarray]:
        """Eager FP32 (logits, embedding) on eval_set(purpose), cached."""
        if purpose not in self._references:
            self._references[purpose] = run_batched(eager_runner(self.model), self.eval_set(purpose).pixel_values,
                                                    self.max_batch_size)
        return self._references[purpose]

    def evaluate(self, runner: Runner, *, batch_size: int | None = None, purpose: str = "verify") -> dict[str, Any]:
        """Run `runner` over eval_set(purpose) in batches (max_batch_size by
        default) and return dinov2_triton.train.metrics.parity_metrics against the eager
        reference, with label metrics when the set is labelled."""
        from dinov2_triton.train.metrics import parity_metrics

        es = self.eval_set(purpose)
        ref_lo, ref_em = self.reference_outputs(purpose)
        lo, em = run_batched(runner, es.pixel_values, batch_size or self.max_batch_size)
        return parity_metrics(ref_lo, lo, ref_embedding=ref_em, cand_embedding=em,
                              labels=es.labels, names=es.names)
