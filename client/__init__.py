"""cnnd.client: the Python SDK for a cnnd server.

    from cnnd.client import Batching, Client

    with Client("127.0.0.1:50051") as c:
        model = c.create_model(spec, name="lenet", batching=Batching(max_batch_size=32))
        data = c.upload_dataset(x, y, name="digits")
        job = c.train(model, data, epochs=5, optimizer="adam", lr=1e-3, validation=0.2)
        job.wait()                                  # live progress bar
        result = c.infer(model, x[:8])              # .logits .probabilities .classes

Every failure raises a ``CnndError`` subclass (NotFound, InvalidArgument, Unavailable, ...).
"""

from cnnd.client._client import TLS, Client
from cnnd.client._errors import (
    AlreadyExists,
    Cancelled,
    CnndError,
    DeadlineExceeded,
    FailedPrecondition,
    InternalError,
    InvalidArgument,
    JobFailed,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from cnnd.client._types import (
    Batching,
    Dataset,
    EpochMetrics,
    InferResult,
    Inspection,
    Job,
    JobEvent,
    LayerSummary,
    Model,
    ModelVersion,
    ParameterStats,
    Progress,
)

__all__ = [
    "TLS",
    "AlreadyExists",
    "Batching",
    "Cancelled",
    "Client",
    "CnndError",
    "Dataset",
    "DeadlineExceeded",
    "EpochMetrics",
    "FailedPrecondition",
    "InferResult",
    "Inspection",
    "InternalError",
    "InvalidArgument",
    "Job",
    "JobEvent",
    "JobFailed",
    "LayerSummary",
    "Model",
    "ModelVersion",
    "NotFound",
    "ParameterStats",
    "PermissionDenied",
    "Progress",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
]
