"""Run by tests/test_tritonclient.py inside .venv-triton: prints, as JSON, the protobuf descriptors
of every `inference.*` message, enum and the GRPCInferenceService methods that tritonclient ships
(its service_pb2 and model_config_pb2), for the test to compare with protos/grpc_service.proto.
Nothing of this project is imported here (the two register the same proto names)."""

import json


def _message(d, out):
    fields = {}
    for f in d.fields:
        fields[f.name] = {
            "number": f.number,
            "type": f.type,
            "repeated": f.is_repeated,
            "type_name": (f.message_type or f.enum_type).full_name if (f.message_type or f.enum_type) else "",
            "oneof": f.containing_oneof.name if f.containing_oneof else "",
        }
    out["messages"][d.full_name] = fields
    for nested in d.nested_types:
        _message(nested, out)
    for e in d.enum_types:
        out["enums"][e.full_name] = {v.name: v.number for v in e.values}


def describe(file_descriptors, service) -> dict:
    """Messages (fields: number, type, label, type name, oneof), enums and methods, by full name."""
    out = {"messages": {}, "enums": {}, "methods": {}}
    for fd in file_descriptors:
        for d in fd.message_types_by_name.values():
            _message(d, out)
        for e in fd.enum_types_by_name.values():
            out["enums"][e.full_name] = {v.name: v.number for v in e.values}
    for m in service.methods:
        out["methods"][m.name] = {
            "input": m.input_type.full_name,
            "output": m.output_type.full_name,
            "client_streaming": m.client_streaming,
            "server_streaming": m.server_streaming,
        }
    return out


def main() -> None:
    from tritonclient.grpc import model_config_pb2, service_pb2

    service = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    print(json.dumps(describe([service_pb2.DESCRIPTOR, model_config_pb2.DESCRIPTOR], service)))


if __name__ == "__main__":
    main()
