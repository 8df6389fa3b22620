"""Export: transformed models as files other runtimes run (ONNX for onnxruntime)."""
