"""Stage 2, train: the DINOv2 model factory and weight layouts, fine-tuning (linear, full
with layer decay, LoRA, last-N), metrics, the checkpoint record and exact resume."""
