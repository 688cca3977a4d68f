"""Serving for every DreamFrame service: one gRPC server setup, one client channel setup.

Server side: ``GrpcServer``/``serve`` with health (real readiness), reflection, exception mapping,
callers' bearer tokens with roles (auth.py), Prometheus metrics, access logs, TLS and graceful shutdown.
Client side: ``make_channel`` with retries, round-robin, default deadlines, token and TLS;
``error_detail_from``/``domain_error_from`` to read a failed call's google.rpc.Status details.
Streaming: ``stream_from_thread``/``stream_from_task`` run a long RPC's work and stream its progress.
"""

from __future__ import annotations

from dreamframe.serving.auth import METHOD_ROLES, CallerAuthInterceptor, bearer
from dreamframe.serving.client import make_channel, make_sync_channel, service_config
from dreamframe.serving.errors import (
    STATUS_BY_ERROR,
    StatusDetail,
    domain_error_from,
    error_detail_from,
    rich_status,
    status_code_for,
)
from dreamframe.serving.health import HealthServicer
from dreamframe.serving.interceptors import (
    AccessLogInterceptor,
    Caller,
    ExceptionInterceptor,
    ObservingInterceptor,
    StreamWritingInterceptor,
    current_caller,
)
from dreamframe.serving.metrics import MetricsInterceptor, ServerMetrics
from dreamframe.serving.server import GrpcServer, Registration, ServiceCannotStart, run_service, serve
from dreamframe.serving.streaming import (
    Done,
    ThreadJobs,
    progress_to_proto,
    stream_from_task,
    stream_from_thread,
)

__all__ = [
    "METHOD_ROLES",
    "STATUS_BY_ERROR",
    "AccessLogInterceptor",
    "Caller",
    "CallerAuthInterceptor",
    "Done",
    "ExceptionInterceptor",
    "GrpcServer",
    "HealthServicer",
    "MetricsInterceptor",
    "ObservingInterceptor",
    "Registration",
    "ServerMetrics",
    "ServiceCannotStart",
    "StatusDetail",
    "StreamWritingInterceptor",
    "ThreadJobs",
    "bearer",
    "current_caller",
    "domain_error_from",
    "error_detail_from",
    "make_channel",
    "make_sync_channel",
    "progress_to_proto",
    "rich_status",
    "run_service",
    "serve",
    "service_config",
    "status_code_for",
    "stream_from_task",
    "stream_from_thread",
]
