"""Generated gRPC/protobuf code for the cnnd.v1 API (see protos/generate.py)."""
