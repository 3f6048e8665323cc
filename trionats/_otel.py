"""OpenTelemetry tracing (extra ``otel``): publish, request and handler spans.

Spans follow the OpenTelemetry messaging semantic conventions: ``messaging.system =
"nats"``, ``messaging.destination.name``, ``messaging.operation.type`` (``send`` for a
publish or a request, ``process`` for a handler), ``messaging.operation.name``,
``messaging.message.body.size``; span names are ``"{operation} {destination}"``
(``publish orders.new``, ``request svc.echo``, ``process orders.*``: a handler's span is
named after the subject *pattern* it subscribed to, the concrete subject is an attribute).

The trace context travels in the message headers (``traceparent``/``tracestate`` with the
default W3C propagator; whatever the global propagator writes), so a handler's span is a
child of the publisher's span across connections and processes.

Off by default, at no cost: whether a connection traces is decided once, when it opens
(:func:`tracer_for`). With ``tracing=None`` (the default) it traces when
``opentelemetry-api`` is importable and a real tracer provider (an SDK one) is installed
globally; the API's default no-op/proxy provider means off, and so does an application
that never imported ``opentelemetry.trace`` (nothing is imported then). A connection that does not
trace has ``_tracer = None``: its publish and request pay one ``is not None`` test, and no
header is added.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import TYPE_CHECKING, Any, TypeVar, final

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping

    from opentelemetry.context import Context
    from opentelemetry.trace import Span, Tracer

    from ._connection import Connection
    from ._msg import Msg

__all__ = ["NatsTracer", "tracer_for"]

_SYSTEM = "nats"
_INSTRUMENTATION = "trionats"
_EXTRA_HINT = "pip install 'trionats[otel]'"
_PROVIDER_ENV = "OTEL_PYTHON_TRACER_PROVIDER"  # the API loads this provider on first use

_M = TypeVar("_M")


def _import_trace() -> Any:
    try:
        from opentelemetry import trace
    except ImportError as exc:
        raise ImportError(f"tracing needs the opentelemetry-api package: {_EXTRA_HINT}") from exc
    return trace


def _version() -> str:
    from . import __version__

    return __version__


def tracer_for(tracing: object) -> NatsTracer | None:
    """The tracer of a connection opened with ``tracing=...``, or None (tracing off).

    Args:
        tracing: None: on when opentelemetry-api is installed and the global tracer
            provider is a real one (not the API's no-op or proxy default); False: off;
            True: on with the global provider (ImportError when opentelemetry-api is
            missing); a ``TracerProvider``: on with that provider.

    Raises:
        TypeError: ``tracing`` is none of those.
        ImportError: tracing asked for (True or a provider) and opentelemetry-api missing.
    """
    if tracing is None:
        # Nothing to import (50 ms or more) when the application never imported the API:
        # then it cannot have installed a provider, unless through the environment.
        if "opentelemetry.trace" not in sys.modules and _PROVIDER_ENV not in os.environ:
            return None
        try:
            from opentelemetry import trace
        except ImportError:
            return None
        provider: Any = trace.get_tracer_provider()
        if isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
            return None
    elif tracing is False:
        return None
    elif tracing is True:
        provider = _import_trace().get_tracer_provider()
    elif callable(getattr(tracing, "get_tracer", None)) and not isinstance(tracing, type):
        _import_trace()
        provider = tracing
    else:
        raise TypeError(
            "tracing must be None (automatic), True, False or an OpenTelemetry "
            f"TracerProvider, got {type(tracing).__name__}: {tracing!r}"
        )
    return NatsTracer(provider.get_tracer(_INSTRUMENTATION, _version()))


class _HeaderGetter:
    """Reads a propagation field from NATS headers, whatever the case of its name."""

    def get(self, carrier: Mapping[str, str], key: str) -> list[str] | None:
        value = carrier.get(key)
        if value is None:
            lower = key.lower()
            for name, v in carrier.items():
                if name.lower() == lower:
                    value = v
                    break
            else:
                return None
        return [value]

    def keys(self, carrier: Mapping[str, str]) -> list[str]:
        return list(carrier)


_GETTER: Any = _HeaderGetter()  # duck-typed: opentelemetry is imported only when used


def _error_type(exc: BaseException) -> str:
    cls = type(exc)
    module = cls.__module__
    if module.startswith("trionats."):
        module = "trionats"  # the public name: trionats.TimeoutError, not trionats._errors
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


@final
class NatsTracer:
    """One connection's tracer: spans and context propagation (tracing is on)."""

    def __init__(self, tracer: Tracer) -> None:
        from opentelemetry import propagate, trace
        from opentelemetry.trace import SpanKind, Status, StatusCode

        self.tracer = tracer
        self._propagate = propagate
        self._trace = trace
        self._producer = SpanKind.PRODUCER
        self._client = SpanKind.CLIENT
        self._consumer = SpanKind.CONSUMER
        self._error = Status
        self._error_code = StatusCode.ERROR

    # -- helpers -----------------------------------------------------------------------
    def _fail(self, span: Span, exc: BaseException) -> None:
        if not span.is_recording():
            return
        span.set_attribute("error.type", _error_type(exc))
        if isinstance(exc, Exception):
            span.record_exception(exc)
        span.set_status(self._error(self._error_code, f"{type(exc).__name__}: {exc}"))

    def _inject(self, headers: dict[str, str] | None) -> dict[str, str]:
        """A copy of ``headers`` (never the caller's dict) with the current trace context."""
        out = {} if headers is None else dict(headers)
        self._propagate.inject(out)
        return out

    def _attributes(
        self, operation: str, kind: str, subject: str, size: int, conn: Connection
    ) -> dict[str, Any]:
        attributes: dict[str, Any] = {
            "messaging.system": _SYSTEM,
            "messaging.operation.type": kind,
            "messaging.operation.name": operation,
            "messaging.destination.name": subject,
            "messaging.message.body.size": size,
        }
        if conn.name:
            attributes["messaging.client.id"] = conn.name
        return attributes

    # -- publish / request ---------------------------------------------------------------
    async def publish(
        self,
        conn: Connection,
        subject: str,
        data: Any,
        reply: str,
        headers: dict[str, str] | None,
    ) -> None:
        """``conn._publish`` inside a ``publish {subject}`` PRODUCER span."""
        with self.tracer.start_as_current_span(
            f"publish {subject}",
            kind=self._producer,
            attributes=self._attributes("publish", "send", subject, len(data), conn),
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                await conn._publish(subject, data, reply, self._inject(headers))
            except BaseException as exc:
                self._fail(span, exc)
                raise

    async def request(
        self,
        conn: Connection,
        subject: str,
        data: Any,
        timeout: float | None,
        headers: dict[str, str] | None,
    ) -> Msg:
        """``conn._request`` inside a ``request {subject}`` CLIENT span (the round trip).

        JetStream acknowledgements (``$JS.ACK.`` subjects, one per message) get no span:
        the handler's span covers them.
        """
        if subject.startswith("$JS.ACK."):
            return await conn._request(subject, data, timeout, headers)
        with self.tracer.start_as_current_span(
            f"request {subject}",
            kind=self._client,
            attributes=self._attributes("request", "send", subject, len(data), conn),
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                msg = await conn._request(subject, data, timeout, self._inject(headers))
            except BaseException as exc:
                self._fail(span, exc)
                raise
            if span.is_recording():
                span.set_attribute("trionats.reply.body.size", len(msg.data))
            return msg

    # -- handlers ----------------------------------------------------------------------
    def context_of(self, headers: Mapping[str, str] | None) -> Context:
        """The trace context a message carries (an empty one: the span is a root)."""
        from opentelemetry.context import Context

        if not headers:
            return Context()
        return self._propagate.extract(headers, context=Context(), getter=_GETTER)

    def wrap_handler(
        self,
        handler: Callable[[_M], Awaitable[Any]],
        pattern: str,
        *,
        queue: str | None = None,
        subscription: str | None = None,
    ) -> Callable[[_M], Awaitable[Any]]:
        """``handler`` inside a ``process {pattern}`` CONSUMER span, child of the
        message's trace context.

        Args:
            handler: the subscriber's handler.
            pattern: the subscribed subject (or ``stream/consumer``): the span name.
            queue: the queue group (``messaging.consumer.group.name``).
            subscription: a JetStream consumer (``messaging.destination.subscription.name``).
        """
        tracer = self.tracer
        name = f"process {pattern}"
        kind = self._consumer
        base: dict[str, Any] = {
            "messaging.system": _SYSTEM,
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.template": pattern,
        }
        if queue is not None:
            base["messaging.consumer.group.name"] = queue
        if subscription is not None:
            base["messaging.consumer.group.name"] = subscription
            base["messaging.destination.subscription.name"] = subscription
        context_of = self.context_of
        fail = self._fail

        @functools.wraps(handler)
        async def traced(msg: Any) -> Any:
            attributes = dict(base)
            attributes["messaging.destination.name"] = msg.subject
            attributes["messaging.message.body.size"] = len(msg.data)
            with tracer.start_as_current_span(
                name,
                context=context_of(msg.headers),
                kind=kind,
                attributes=attributes,
                record_exception=False,
                set_status_on_exception=False,
            ) as span:
                try:
                    return await handler(msg)
                except BaseException as exc:
                    fail(span, exc)
                    raise

        return traced
