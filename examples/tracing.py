"""OpenTelemetry tracing: one trace from a client's request to the service's handler.

The client and the service use two connections (two processes in real life); the trace
context travels in the request's ``traceparent`` header, so the handler's span is a child
of the client's request span. Spans go to an in-memory exporter and are printed as a tree
(swap in an OTLP exporter to send them to a collector).

Needs ``pip install 'trionats[otel]' opentelemetry-sdk``. Run ``trionats server --port
4222`` first (or set ``NATS_URL``), then ``python examples/tracing.py``.
"""

import os

import trio
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import trionats

NATS_URL = os.environ.get("NATS_URL", "nats://127.0.0.1:4222")

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)  # connections opened from now on trace
tracer = trace.get_tracer("example")


async def lookup(msg: trionats.Msg) -> bytes:
    """The service's handler: its span is a child of the client's request span."""
    with tracer.start_as_current_span("db lookup"):  # the handler's own work
        await trio.sleep(0.01)
    return b"order " + msg.data + b": shipped"


def print_tree(spans: list[ReadableSpan]) -> None:
    children: dict[int | None, list[ReadableSpan]] = {}
    for span in spans:
        children.setdefault(span.parent.span_id if span.parent else None, []).append(span)

    def show(parent: int | None, depth: int) -> None:
        for span in sorted(children.get(parent, []), key=lambda s: s.start_time or 0):
            attributes = span.attributes or {}
            system = attributes.get("messaging.system", "")
            print(f"{'  ' * depth}{span.name} [{span.kind.name.lower()}] {system}".rstrip())
            assert span.context is not None
            show(span.context.span_id, depth + 1)

    show(None, 0)


async def main() -> None:
    async with (
        trionats.open_connection(NATS_URL, name="orders-service") as service,
        trionats.open_connection(NATS_URL, name="web") as client,
        trionats.open_subscriber(service) as subscriber,
    ):
        assert service.tracing
        assert client.tracing
        await subscriber.start("orders.status", lookup)
        with tracer.start_as_current_span("GET /orders/42"):  # e.g. a web request
            reply = await client.request("orders.status", b"42", timeout=5)
        print(reply.data.decode())
    spans = exporter.get_finished_spans()
    print_tree(list(spans))
    trace_ids = {span.context.trace_id for span in spans if span.context is not None}
    print(f"{len(spans)} spans, {len(trace_ids)} trace")


trio.run(main)
