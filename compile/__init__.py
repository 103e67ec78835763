"""apt_hal.compile: export HAL models to ONNX and TensorRT, validated against eager."""
