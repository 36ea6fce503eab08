"""The `lstm.*` metadata keys an exported ONNX file carries (ModelProto.metadata_props).

The exporter writes them; the server reads them to name axes, pick an input's dtype and describe a
model. A file without them (someone else's export) is served from its graph alone.
"""

from __future__ import annotations

CONFIG = "lstm.config"  # RecurrentConfig as JSON: cell, sizes, layers, bidirectional
PARAM_COUNT = "lstm.param_count"  # parameters of the exported module
EXPORT_MODE = "lstm.export_mode"  # "dynamic" (native recurrent nodes) or "static" (unrolled over T)
STATIC_LENGTH = "lstm.static_length"  # T of a static export; "" for a dynamic one
AXES = "lstm.axes"  # JSON {tensor: [axis names]} of the file's own inputs and outputs
INITIAL_STATE = "lstm.initial_state"  # comma-separated initial-state inputs (h0, c0), "" for none
INPUT = "lstm.input"  # "tokens" when x is int64 token ids (batch, time) looked up by an nn.Embedding
VOCAB_SIZE = "lstm.vocab_size"  # with INPUT "tokens": ids are below this
SEMANTICS = "lstm.semantics"  # what padding means for the outputs, in words
TORCH_VERSION = "lstm.torch_version"  # of the exporting process
ONNX_VERSION = "lstm.onnx_version"
OPSET = "lstm.opset"
WEIGHTS_SHA256 = "lstm.weights_sha256"  # of the module's parameters: twins name the weights they came from

# precision twins (int8/fp16 files written beside an fp32 export)
PRECISION = "lstm.precision"  # "fp32", "int8" or "fp16"
TWIN_OF = "lstm.twin_of"  # the fp32 model a twin was made from
PRECISION_METHOD = "lstm.precision_method"
PRECISION_TOLERANCE = "lstm.precision_tolerance"
PRECISION_MAX_ABS_ERROR = "lstm.precision_max_abs_error"
PRECISION_CHECKED_ON = "lstm.precision_checked_on"  # the ONNX Runtime provider the twin's gate ran on
PRECISION_ACCURACY = "lstm.precision_accuracy"
