"""One module per exported variant: torchscript, onnx, onnx_fp16, onnx_int8,
onnx_int8_dynamic, openvino (+ openvino_int8) and the TensorRT engines. Each
module registers its variants with dinov2_triton.export.registry when
imported (the registry lists these modules) and builds its artifact from the
checkpoint or its parent variant; verifying, gating and publishing are
dinov2_triton.export's."""
