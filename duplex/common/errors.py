"""Domain errors and their gRPC status codes, mapped in one place.

Handlers raise DuplexError subclasses; ErrorInterceptor turns them into statuses. Anything else becomes
INTERNAL with a generic message, and its traceback goes to the log, never to the client.

A status that says when to retry, or which quota ran out, also carries the standard rich error model: a
`google.rpc.Status` in the `grpc-status-details-bin` trailer with `google.rpc.RetryInfo` and
`google.rpc.QuotaFailure` (read with grpcio-status: `grpc_status.rpc_status.from_call(call)`), besides the
plain `retry-after-ms` trailer. Between Duplex services both travel back into the DuplexError, so the
gateway passes a refusal from session_service on unchanged.
"""

import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from google.protobuf import message as protobuf_message
from google.rpc import error_details_pb2, status_pb2

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuotaViolation:
    """One quota a request ran into (google.rpc.QuotaFailure.Violation)."""

    subject: str  # on whom the quota is counted, e.g. "user" (the caller)
    description: str  # for people: which limit, e.g. "2 messages per minute"
    quota_id: str = ""  # stable, for programs: e.g. "MessagesPerMinutePerUser"
    quota_metric: str = ""  # what is counted: e.g. "duplex/messages"
    quota_value: int = 0  # the limit


class DuplexError(Exception):
    code = grpc.StatusCode.INTERNAL
    retryable = False

    def __init__(
        self, message: str, *, retry_after: float | None = None, quota_violations: Sequence[QuotaViolation] = ()
    ):
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.quota_violations = tuple(quota_violations)


class InvalidArgument(DuplexError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(DuplexError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(DuplexError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(DuplexError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(DuplexError):
    code = grpc.StatusCode.ABORTED
    retryable = True


class OutOfRange(DuplexError):
    code = grpc.StatusCode.OUT_OF_RANGE


class Unauthenticated(DuplexError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(DuplexError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(DuplexError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    retryable = True


class Unavailable(DuplexError):
    code = grpc.StatusCode.UNAVAILABLE
    retryable = True


class DeadlineExceeded(DuplexError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    retryable = True


class Cancelled(DuplexError):
    code = grpc.StatusCode.CANCELLED


class Internal(DuplexError):
    code = grpc.StatusCode.INTERNAL


_BY_CODE = {cls.code: cls for cls in DuplexError.__subclasses__()}
_BY_NUMBER = {code.value[0]: cls for code, cls in _BY_CODE.items()}
GENERIC_INTERNAL_MESSAGE = "internal error"
# Trailing metadata that carries a retry-after hint between services (milliseconds).
RETRY_AFTER_KEY = "retry-after-ms"


# Where grpc carries a google.rpc.Status (grpc-status-details-bin), the key grpcio-status reads.
STATUS_DETAILS_KEY = "grpc-status-details-bin"


def status_details(error: DuplexError) -> status_pb2.Status | None:
    """The rich status for an error that says when to retry (RetryInfo) or which quota it hit (QuotaFailure);
    None for one that says neither. Its code and message are the status's own, as grpcio-status requires."""
    details = []
    if error.retry_after:
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromMilliseconds(retry_after_ms(error))  # exactly the trailer's figure
        details.append(retry)
    if error.quota_violations:
        details.append(error_details_pb2.QuotaFailure(violations=[
            error_details_pb2.QuotaFailure.Violation(
                subject=v.subject, description=v.description, quota_id=v.quota_id, quota_metric=v.quota_metric,
                quota_value=v.quota_value,
            )
            for v in error.quota_violations
        ]))
    if not details:
        return None
    status = status_pb2.Status(code=error.code.value[0], message=error.message)
    for detail in details:
        status.details.add().Pack(detail)
    return status


def retry_after_ms(error: DuplexError) -> int:
    return int(error.retry_after * 1000)


def status_trailers(error: BaseException) -> tuple[tuple[str, str | bytes], ...]:
    """The trailing metadata that goes with `to_status(error)`: the retry-after hint and the rich status."""
    if not isinstance(error, DuplexError):
        return ()
    trailers: list[tuple[str, str | bytes]] = []
    if error.retry_after:
        trailers.append((RETRY_AFTER_KEY, str(retry_after_ms(error))))
    status = status_details(error)
    if status is not None:
        trailers.append((STATUS_DETAILS_KEY, status.SerializeToString()))
    return tuple(trailers)


async def abort(context: grpc.aio.ServicerContext, error: BaseException):
    """End the call with `error`'s status and trailers (for a handler that ends a call itself)."""
    code, message = to_status(error)
    await context.abort(code, message, trailing_metadata=status_trailers(error))


@dataclass(frozen=True)
class _Hints:
    retry_after: float | None = None
    quota_violations: tuple[QuotaViolation, ...] = ()


def _hints(error: grpc.aio.AioRpcError) -> _Hints:
    """What another service's status said about retrying and quotas (RetryInfo first, then retry-after-ms)."""
    retry_after, violations = None, ()
    for key, value in error.trailing_metadata() or ():
        if key == RETRY_AFTER_KEY and retry_after is None:
            try:
                retry_after = int(value) / 1000
            except ValueError:
                pass
        elif key == STATUS_DETAILS_KEY:
            try:
                status = status_pb2.Status.FromString(value)
            except protobuf_message.DecodeError:
                continue
            for detail in status.details:
                if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                    retry = error_details_pb2.RetryInfo()
                    detail.Unpack(retry)
                    retry_after = retry.retry_delay.ToNanoseconds() / 1e9 or retry_after
                elif detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
                    failure = error_details_pb2.QuotaFailure()
                    detail.Unpack(failure)
                    violations = tuple(
                        QuotaViolation(v.subject, v.description, v.quota_id, v.quota_metric, v.quota_value)
                        for v in failure.violations
                    )
    return _Hints(retry_after, violations)


def from_rpc_error(error: grpc.aio.AioRpcError, service: str) -> DuplexError:
    """What a client raises for a failed call to another service: same code, typed, no leaked details."""
    cls = _BY_CODE.get(error.code(), Unavailable)
    if cls is Internal or error.code() == grpc.StatusCode.UNKNOWN:
        return Internal(f"{service} failed")
    hints = _hints(error)
    if error.code() == grpc.StatusCode.UNAVAILABLE:
        return Unavailable(f"{service} is unavailable", retry_after=hints.retry_after)
    return cls(
        error.details() or f"{service} answered {error.code().name}",
        retry_after=hints.retry_after, quota_violations=hints.quota_violations,
    )


def from_status(code: int, message: str) -> DuplexError:
    """The typed error for a status carried inside a response (a google.rpc.Code number and a message),
    such as one refused part of a batch call."""
    cls = _BY_NUMBER.get(code, Internal)
    return cls(message)


def to_status(error: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(error, DuplexError):
        return error.code, error.message
    log.error("unhandled error", exc_info=error)
    return grpc.StatusCode.INTERNAL, GENERIC_INTERNAL_MESSAGE


def _guard(behavior, parse):
    """Wrap one handler (coroutine or async generator) so that its request is parsed here and exceptions
    become statuses."""
    if inspect.isasyncgenfunction(behavior):

        async def guarded_stream(request, context):
            try:
                async for response in behavior(parse(request), context):
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as error:
                await abort(context, error)

        return guarded_stream

    async def guarded(request, context):
        try:
            return await behavior(parse(request), context)
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            await abort(context, error)

    return guarded


def _parser(deserialize, streaming: bool):
    """Requests arrive as bytes and are parsed in the handler, so a malformed one (not protobuf, a
    truncated varint, bad UTF-8 in a string) is INVALID_ARGUMENT; grpc's own deserializer would answer
    UNKNOWN with the parser's exception in the message."""
    if deserialize is None:
        return lambda request: request

    def parse_one(raw: bytes):
        try:
            return deserialize(raw)
        except protobuf_message.DecodeError as error:
            raise InvalidArgument(f"malformed request: {_decode_reason(error)}") from None

    async def parse_each(raw_requests):
        async for raw in raw_requests:
            yield parse_one(raw)

    return parse_each if streaming else parse_one


def _decode_reason(error: protobuf_message.DecodeError) -> str:
    # "Error parsing message with type 'pkg.Message': String field had bad UTF-8" -> the part after the type.
    text = str(error)
    return text.rpartition(": ")[2] if ": " in text else "not a valid protobuf message"


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behavior = getattr(handler, kind)
            if behavior is not None:
                parse = _parser(handler.request_deserializer, streaming=kind.startswith("stream"))
                return handler._replace(**{kind: _guard(behavior, parse), "request_deserializer": None})
        return handler
