"""Which models of a repository the local CPU server loads, and why not the others.

The server runs with explicit model control, so only what can run here is
asked for: TensorRT plans and KIND_GPU instance groups need an NVIDIA GPU,
an unparsable config.pbtxt cannot load, and an ensemble is only as runnable
as its steps. Each skipped model gets a reason that goes to the server log
and to ``dinov2-triton serve start|status``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from dinov2_triton.serve.errors import ServeError

TENSORRT_REASON = "needs an NVIDIA GPU and TensorRT"


def read_model_config(config_path: str | os.PathLike):
    """Parse a config.pbtxt into ``tritonclient.grpc.model_config_pb2.ModelConfig``."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(Path(config_path).read_text(), model_config_pb2.ModelConfig())


def _gpu_reason(cfg) -> str | None:
    """Why a model cannot run on this CPU-only machine, or None."""
    if cfg.platform == "tensorrt_plan" or cfg.backend == "tensorrt":
        return TENSORRT_REASON
    from tritonclient.grpc import model_config_pb2

    if any(g.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU for g in cfg.instance_group):
        return "instance_group KIND_GPU needs an NVIDIA GPU"
    return None


@dataclass
class ModelPlan:
    load: list = field(default_factory=list)  # names to pass as --load-model
    skipped: dict = field(default_factory=dict)  # name -> reason


def plan_models(repository: str | os.PathLike, models: str | Sequence[str] = "*") -> ModelPlan:
    """Decide which models of ``repository`` to load, reading each config.pbtxt.

    ``models``: ``"*"`` for every model that can run here, or a list of names
    (a name not in the repository raises ``ValueError``). TensorRT plans,
    KIND_GPU instance groups, unreadable configs and ensembles that use a
    skipped model are skipped with a reason.
    """
    repo = Path(repository)
    if not repo.is_dir():
        raise ServeError(f"model repository {repo} does not exist")
    configs, skipped = {}, {}
    for model_dir in sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith(".")):
        cfg_path = model_dir / "config.pbtxt"
        if not cfg_path.is_file():
            continue
        try:
            configs[model_dir.name] = read_model_config(cfg_path)
        except Exception as exc:  # text_format.ParseError and friends
            skipped[model_dir.name] = f"config.pbtxt cannot be parsed: {exc}"
    available = set(configs) | set(skipped)
    if models == "*":
        wanted = sorted(available)
    else:
        wanted = list(dict.fromkeys(models))
        unknown = [m for m in wanted if m not in available]
        if unknown:
            raise ValueError(f"model(s) {unknown} not in {repo}; available: {sorted(available)}")
    for name, cfg in configs.items():
        reason = _gpu_reason(cfg)
        if reason:
            skipped[name] = reason
    changed = True
    while changed:  # an ensemble is only as runnable as its steps (nested ensembles too)
        changed = False
        for name, cfg in configs.items():
            if name in skipped or cfg.platform != "ensemble":
                continue
            for step in cfg.ensemble_scheduling.step:
                if step.model_name in skipped or step.model_name not in available:
                    why = skipped.get(step.model_name, "not in the repository")
                    skipped[name] = f"ensemble step '{step.model_name}' cannot load ({why})"
                    changed = True
                    break
    return ModelPlan(load=[m for m in wanted if m not in skipped],
                     skipped={m: skipped[m] for m in wanted if m in skipped})
