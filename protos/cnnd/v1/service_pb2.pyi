from cnnd.v1 import datasets_pb2 as _datasets_pb2
from cnnd.v1 import inference_pb2 as _inference_pb2
from cnnd.v1 import jobs_pb2 as _jobs_pb2
from cnnd.v1 import models_pb2 as _models_pb2
from google.protobuf import descriptor as _descriptor
from typing import ClassVar as _ClassVar

DESCRIPTOR: _descriptor.FileDescriptor
