"""Generated Open Inference Protocol v2 stubs (`make proto`); never edit the *_pb2* files by hand."""
