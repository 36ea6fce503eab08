"""gRPC inference server (KServe Open Inference Protocol v2) over ONNX Runtime."""
