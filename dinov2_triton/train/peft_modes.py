"""Which parameters train: linear probe, full fine-tune, LoRA (peft), last-N blocks.

Every mode hands back a plain `DinoV2Classifier` for saving (`export_model`):
LoRA adapters are merged into the attention weights first, so export,
serving and `dinov2_triton.train.model.load_classifier` never see peft."""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any

from torch import nn

log = logging.getLogger(__name__)

MODES = ("linear", "full", "lora", "lastn")
# LoRA goes on the attention projections only (qkv and output proj of every
# block); the regex keeps peft away from patch_embed.proj, a Conv2d.
LORA_TARGETS = r".*backbone\.blocks\.\d+\.attn\.(qkv|proj)"


@dataclass
class ModeSetup:
    """The module to train plus what it needs to switch phases and be saved."""
    mode: str
    model: nn.Module                 # DinoV2Classifier (with LoRA layers injected in lora mode)
    peft_model: Any = None           # the peft.PeftModel wrapper in lora mode
    unfreeze_blocks: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    def set_phase(self, linear_probe: bool) -> None:
        """Set requires_grad for this mode; linear_probe=True trains the head only
        (the --lp-epochs warm start, and the whole run in linear mode)."""
        n_blocks = len(self.model.backbone.blocks)
        first_trainable = n_blocks - self.unfreeze_blocks
        for name, p in self.model.named_parameters():
            if name.startswith("head."):
                p.requires_grad_(True)
            elif linear_probe or self.mode == "linear":
                p.requires_grad_(False)
            elif self.mode == "full":
                p.requires_grad_(True)
            elif self.mode == "lora":
                p.requires_grad_("lora_" in name)
            elif self.mode == "lastn":
                block = _block_index(name)
                p.requires_grad_(name.startswith("backbone.norm.")
                                 or (block is not None and block >= first_trainable))
        # Frozen LayerNorms/tokens have no train-time behaviour to switch, but
        # keep timm modules in train() so drop-path (if configured) stays active.

    def counts(self) -> dict[str, int]:
        total = sum(p.numel() for n, p in self.model.named_parameters() if "lora_" not in n)
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return {"parameters": total, "trainable": trainable}

    def export_model(self) -> nn.Module:
        """A plain DinoV2Classifier with the current weights (LoRA merged into a copy;
        the training model is untouched so training can go on)."""
        if self.mode != "lora":
            return self.model
        merged = copy.deepcopy(self.peft_model).merge_and_unload()
        leftovers = [k for k in merged.state_dict() if "lora_" in k or "base_layer" in k]
        if leftovers:
            raise RuntimeError(f"LoRA merge left adapter keys behind: {leftovers[:5]}")
        return merged


def _block_index(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "backbone" and parts[1] == "blocks":
        return int(parts[2])
    return None


def setup_mode(model: nn.Module, mode: str, *, lora_rank: int = 8, lora_alpha: float = 16.0,
               lora_dropout: float = 0.0, unfreeze_blocks: int = 2) -> ModeSetup:
    """Prepare `model` (a DinoV2Classifier) for training in `mode`."""
    if mode not in MODES:
        raise ValueError(f"--mode {mode!r}: choose one of {MODES}")
    n_blocks = len(model.backbone.blocks)
    if mode == "lastn" and not 1 <= unfreeze_blocks <= n_blocks:
        raise ValueError(f"--unfreeze-blocks {unfreeze_blocks}: must be between 1 and {n_blocks} "
                         f"(the backbone has {n_blocks} blocks)")
    if mode == "lora":
        if lora_rank < 1:
            raise ValueError(f"--lora-rank {lora_rank}: must be >= 1")
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                            target_modules=LORA_TARGETS, bias="none")
        peft_model = get_peft_model(model, config)
        inner = peft_model.base_model.model   # the same DinoV2Classifier, adapters injected
        setup = ModeSetup(mode, inner, peft_model=peft_model,
                          info={"lora_rank": lora_rank, "lora_alpha": lora_alpha, "targets": "attn.qkv, attn.proj"})
    else:
        setup = ModeSetup(mode, model, unfreeze_blocks=unfreeze_blocks if mode == "lastn" else 0)
    setup.set_phase(linear_probe=False)
    return setup
