"""The closed family of domain errors. Each has a stable code; `api/errors.py` alone maps them to HTTP."""

from __future__ import annotations


class RouterError(Exception):
    """Base of every error the core raises on purpose."""

    code: str = "internal_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(RouterError):
    code = "invalid_request"


class UnsupportedParameter(RouterError):
    code = "unsupported_parameter"


class ModelNotFound(RouterError):
    code = "model_not_found"


class ContextTooLong(RouterError):
    code = "context_length_exceeded"


class Overloaded(RouterError):
    """Queue full or no room to load: the client should retry later."""

    code = "overloaded"

    def __init__(self, message: str, *, retry_after: int = 1, param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.retry_after = retry_after


class NoCapacity(RouterError):
    """No model could be evicted to make room before the timeout: every resident model stayed busy."""

    code = "no_capacity"

    def __init__(self, message: str, *, retry_after: int = 5, param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.retry_after = retry_after


class ModelLoadFailed(RouterError):
    code = "model_load_failed"


class InsufficientMemory(RouterError):
    """The model cannot fit the memory budget even with every idle model evicted."""

    code = "insufficient_memory"


class GenerationTimeout(RouterError):
    code = "timeout"


class GenerationFailed(RouterError):
    code = "generation_failed"
