"""The stages composed: the measurement stage (bench + live parity + report), the
recipe files and the pipeline runner behind ``dinov2-triton pipeline``."""
