"""Clients of a served repository: the image classifier over HTTP/gRPC (ensemble or
bare model), its inputs (images, labels, preprocessing record) and ``dinov2-triton classify``."""
