"""The gRPC servicer: thin. Each method hands its request to a handler and returns the reply;
``rpc_errors`` maps every exception to a status in one place."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from cnnd.server.deps import Deps
from cnnd.server.errors import rpc_errors
from cnnd.server.handlers import datasets, inference, jobs, models
from cnnd.v1 import (
    datasets_pb2,
    inference_pb2,
    jobs_pb2,
    models_pb2,
    service_pb2_grpc,
)

Ctx = grpc.ServicerContext


class CnndServicer(service_pb2_grpc.CnndServiceServicer):
    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    @rpc_errors
    def CreateModel(
        self, request: models_pb2.CreateModelRequest, context: Ctx
    ) -> models_pb2.CreateModelResponse:
        return models_pb2.CreateModelResponse(model=models.create_model(self.deps, request))

    @rpc_errors
    def GetModel(
        self, request: models_pb2.GetModelRequest, context: Ctx
    ) -> models_pb2.GetModelResponse:
        return models_pb2.GetModelResponse(model=models.get_model(self.deps, request))

    @rpc_errors
    def ListModels(
        self, request: models_pb2.ListModelsRequest, context: Ctx
    ) -> models_pb2.ListModelsResponse:
        return models.list_models(self.deps, request)

    @rpc_errors
    def UpdateModel(
        self, request: models_pb2.UpdateModelRequest, context: Ctx
    ) -> models_pb2.UpdateModelResponse:
        return models_pb2.UpdateModelResponse(model=models.update_model(self.deps, request))

    @rpc_errors
    def DeleteModel(
        self, request: models_pb2.DeleteModelRequest, context: Ctx
    ) -> models_pb2.DeleteModelResponse:
        return models.delete_model(self.deps, request)

    @rpc_errors
    def ExportModel(
        self, request: models_pb2.ExportModelRequest, context: Ctx
    ) -> Iterator[models_pb2.ExportModelResponse]:
        yield from models.export_model(self.deps, request)

    @rpc_errors
    def ImportModel(
        self, request_iterator: Iterator[models_pb2.ImportModelRequest], context: Ctx
    ) -> models_pb2.ImportModelResponse:
        return models_pb2.ImportModelResponse(
            model=models.import_model(self.deps, request_iterator)
        )

    @rpc_errors
    def UploadDataset(
        self, request_iterator: Iterator[datasets_pb2.UploadDatasetRequest], context: Ctx
    ) -> datasets_pb2.UploadDatasetResponse:
        return datasets_pb2.UploadDatasetResponse(
            dataset=datasets.upload_dataset(self.deps, request_iterator)
        )

    @rpc_errors
    def GetDataset(
        self, request: datasets_pb2.GetDatasetRequest, context: Ctx
    ) -> datasets_pb2.GetDatasetResponse:
        return datasets_pb2.GetDatasetResponse(dataset=datasets.get_dataset(self.deps, request))

    @rpc_errors
    def ListDatasets(
        self, request: datasets_pb2.ListDatasetsRequest, context: Ctx
    ) -> datasets_pb2.ListDatasetsResponse:
        return datasets.list_datasets(self.deps, request)

    @rpc_errors
    def DeleteDataset(
        self, request: datasets_pb2.DeleteDatasetRequest, context: Ctx
    ) -> datasets_pb2.DeleteDatasetResponse:
        return datasets.delete_dataset(self.deps, request)

    @rpc_errors
    def Train(self, request: jobs_pb2.TrainRequest, context: Ctx) -> jobs_pb2.TrainResponse:
        return jobs_pb2.TrainResponse(job=jobs.train(self.deps, request))

    @rpc_errors
    def GetJob(self, request: jobs_pb2.GetJobRequest, context: Ctx) -> jobs_pb2.GetJobResponse:
        return jobs_pb2.GetJobResponse(job=jobs.get_job(self.deps, request))

    @rpc_errors
    def ListJobs(
        self, request: jobs_pb2.ListJobsRequest, context: Ctx
    ) -> jobs_pb2.ListJobsResponse:
        return jobs.list_jobs(self.deps, request)

    @rpc_errors
    def CancelJob(
        self, request: jobs_pb2.CancelJobRequest, context: Ctx
    ) -> jobs_pb2.CancelJobResponse:
        return jobs_pb2.CancelJobResponse(job=jobs.cancel_job(self.deps, request))

    @rpc_errors
    def WatchJob(
        self, request: jobs_pb2.WatchJobRequest, context: Ctx
    ) -> Iterator[jobs_pb2.WatchJobResponse]:
        yield from jobs.watch_job(self.deps, request, context.is_active)

    @rpc_errors
    def Infer(
        self, request: inference_pb2.InferRequest, context: Ctx
    ) -> inference_pb2.InferResponse:
        return inference.infer(self.deps, request)

    @rpc_errors
    def InferStream(
        self, request_iterator: Iterator[inference_pb2.InferStreamRequest], context: Ctx
    ) -> Iterator[inference_pb2.InferStreamResponse]:
        yield from inference.infer_stream(self.deps, request_iterator, context.is_active)

    @rpc_errors
    def Inspect(
        self, request: inference_pb2.InspectRequest, context: Ctx
    ) -> inference_pb2.InspectResponse:
        return inference.inspect(self.deps, request)
