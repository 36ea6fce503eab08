"""What `export/` writes and `server/` reads, shared by both without either importing the other.

`metadata` names the `lstm.*` keys of an exported file, `graphs` the limits both sides size graphs by,
`onnxfile` reads a file's metadata and size without onnx, `cuda` tells whether ONNX Runtime can use a
GPU here, `cli` is the one-line error and version of every command. Standard library only at import
(the CUDA probe imports onnxruntime when called): the exporter runs without grpc, and a command's
`--help` loads neither grpc nor onnxruntime. Nothing here imports `export` or `server`.
"""
