"""PyTorch LSTM encoders and their dynamic (native ONNX LSTM) and static (unrolled) exports."""
