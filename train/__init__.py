"""Stage 1-2: data preparation and DINOv2 fine-tuning."""
