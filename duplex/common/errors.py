"""Domain errors and their gRPC status codes, mapped in one place.

Handlers raise DuplexError subclasses; ErrorInterceptor turns them into statuses. Anything else becomes
INTERNAL with a generic message, and its traceback goes to the log, never to the client.
"""

import inspect
import logging

import grpc

log = logging.getLogger(__name__)


class DuplexError(Exception):
    code = grpc.StatusCode.INTERNAL
    retryable = False

    def __init__(self, message: str, *, retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


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


def _retry_after(error: grpc.aio.AioRpcError) -> float | None:
    for key, value in error.trailing_metadata() or ():
        if key == RETRY_AFTER_KEY:
            try:
                return int(value) / 1000
            except ValueError:
                return None
    return None


def from_rpc_error(error: grpc.aio.AioRpcError, service: str) -> DuplexError:
    """What a client raises for a failed call to another service: same code, typed, no leaked details."""
    cls = _BY_CODE.get(error.code(), Unavailable)
    if cls is Internal or error.code() == grpc.StatusCode.UNKNOWN:
        return Internal(f"{service} failed")
    if error.code() == grpc.StatusCode.UNAVAILABLE:
        return Unavailable(f"{service} is unavailable", retry_after=_retry_after(error))
    return cls(error.details() or f"{service} answered {error.code().name}", retry_after=_retry_after(error))


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


async def _abort(context: grpc.aio.ServicerContext, error: Exception):
    code, message = to_status(error)
    if isinstance(error, DuplexError) and error.retry_after:
        context.set_trailing_metadata(((RETRY_AFTER_KEY, str(int(error.retry_after * 1000))),))
    await context.abort(code, message)


def _guard(behavior):
    """Wrap one handler (coroutine or async generator) so that exceptions become statuses."""
    if inspect.isasyncgenfunction(behavior):

        async def guarded_stream(request, context):
            try:
                async for response in behavior(request, context):
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as error:
                await _abort(context, error)

        return guarded_stream

    async def guarded(request, context):
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            await _abort(context, error)

    return guarded


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behavior = getattr(handler, kind)
            if behavior is not None:
                return handler._replace(**{kind: _guard(behavior)})
        return handler
