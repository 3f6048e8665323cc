"""OpenTelemetry tracing: spans per the messaging semantic conventions, the trace context
carried in headers across connections and processes, and nothing at all when it is off.

Each test gets its own SDK TracerProvider with an in-memory exporter, passed with
``tracing=provider``: the global provider is never set in this process (it would turn
tracing on for every other test); the subprocess test sets one to check the automatic mode.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap

import pytest
import trio
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from polling import wait_until

import trionats
from trionats import SubscriberConfig, open_subscriber


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def spans(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def one(exporter: InMemorySpanExporter, name: str) -> ReadableSpan:
    found = spans(exporter, name)
    names = [s.name for s in exporter.get_finished_spans()]
    assert len(found) == 1, names
    return found[0]


def assert_child(child: ReadableSpan, parent: ReadableSpan) -> None:
    assert child.parent is not None
    assert child.context is not None
    assert parent.context is not None
    assert child.context.trace_id == parent.context.trace_id
    assert child.parent.span_id == parent.context.span_id
    assert child.parent.is_remote  # it came through the message headers


async def test_publish_and_handler_spans_across_two_connections(
    nats_url: str, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    handled = trio.Event()
    seen_headers: list[dict[str, str] | None] = []

    async def handle(msg: trionats.Msg) -> None:
        seen_headers.append(msg.headers)
        # The handler runs inside its span: its own spans are children of it.
        with provider.get_tracer("app").start_as_current_span("app work"):
            pass
        handled.set()

    async with (
        trionats.open_connection(nats_url, name="sub", tracing=provider) as sub_nc,
        trionats.open_connection(nats_url, name="pub", tracing=provider) as pub_nc,
        open_subscriber(sub_nc) as subscriber,
    ):
        assert sub_nc.tracing
        assert pub_nc.tracing
        await subscriber.start("orders.*", handle, queue="workers")
        await pub_nc.publish("orders.new", b"12345", headers={"k": "v"})
        with trio.fail_after(10):
            await handled.wait()

    publish = one(exporter, "publish orders.new")
    process = one(exporter, "process orders.*")
    work = one(exporter, "app work")
    assert_child(process, publish)
    assert work.parent is not None
    assert process.context is not None
    assert work.parent.span_id == process.context.span_id
    assert publish.kind is SpanKind.PRODUCER
    assert process.kind is SpanKind.CONSUMER
    assert dict(publish.attributes or {}) == {
        "messaging.system": "nats",
        "messaging.operation.type": "send",
        "messaging.operation.name": "publish",
        "messaging.destination.name": "orders.new",
        "messaging.message.body.size": 5,
        "messaging.client.id": "pub",
    }
    assert dict(process.attributes or {}) == {
        "messaging.system": "nats",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.template": "orders.*",
        "messaging.destination.name": "orders.new",
        "messaging.consumer.group.name": "workers",
        "messaging.message.body.size": 5,
    }
    assert publish.status.status_code is StatusCode.UNSET
    # The caller's own headers are kept, and not modified in place.
    (headers,) = seen_headers
    assert headers is not None
    assert headers["k"] == "v"
    assert "traceparent" in headers


async def test_request_reply_pair(
    nats_url: str, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    async def echo(msg: trionats.Msg) -> bytes:
        return b"echo:" + msg.data

    async with (
        trionats.open_connection(nats_url, tracing=provider) as server_nc,
        trionats.open_connection(nats_url, tracing=provider) as client_nc,
        open_subscriber(server_nc) as subscriber,
    ):
        await subscriber.start("svc.>", echo)
        tracer = provider.get_tracer("app")
        with tracer.start_as_current_span("client operation") as outer:
            reply = await client_nc.request("svc.echo", b"hi", timeout=5)
        assert reply.data == b"echo:hi"
        # The reply needs no trace context: only the request carries one.
        assert reply.headers is None

    request = one(exporter, "request svc.echo")
    process = one(exporter, "process svc.>")
    assert_child(process, request)
    assert request.parent is not None
    assert request.parent.span_id == outer.get_span_context().span_id
    assert request.kind is SpanKind.CLIENT
    attributes = dict(request.attributes or {})
    assert attributes["messaging.operation.type"] == "send"
    assert attributes["messaging.operation.name"] == "request"
    assert attributes["messaging.destination.name"] == "svc.echo"
    assert attributes["messaging.message.body.size"] == 2
    assert attributes["trionats.reply.body.size"] == 7


async def test_failures_are_recorded_on_the_spans(
    nats_url: str, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    async def broken(msg: trionats.Msg) -> None:
        raise KeyError("no such order")

    async with (
        trionats.open_connection(nats_url, tracing=provider) as nc,
        open_subscriber(nc, SubscriberConfig(handler_timeout=0.05)) as subscriber,
    ):
        handle = await subscriber.start("broken", broken)
        reply = await nc.request("broken", b"", timeout=5)  # answered with a 500 header
        assert reply.headers is not None
        assert reply.headers["Nats-Service-Error-Code"] == "500"
        with pytest.raises(trionats.NoRespondersError):
            await nc.request("nobody.home", b"", timeout=5)
        await wait_until(lambda: handle.stats().failed == 1)

    process = one(exporter, "process broken")
    assert process.status.status_code is StatusCode.ERROR
    assert (process.attributes or {})["error.type"] == "KeyError"
    assert [e.name for e in process.events] == ["exception"]
    nobody = one(exporter, "request nobody.home")
    assert nobody.status.status_code is StatusCode.ERROR
    assert (nobody.attributes or {})["error.type"] == "trionats.NoRespondersError"


async def test_cancelled_traced_request_ends_its_span(
    nats_url: str, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    async with (
        trionats.open_connection(nats_url, tracing=provider) as nc,
        nc.subscribe("slow"),  # a responder that never answers
    ):
        with trio.move_on_after(0.05) as scope:
            await nc.request("slow", b"", timeout=None)
        assert scope.cancelled_caught
        # The connection is still usable, and still traced.
        await nc.publish("after", b"")
    request = one(exporter, "request slow")
    assert request.status.status_code is StatusCode.ERROR
    assert (request.attributes or {})["error.type"] == "trio.Cancelled"
    assert request.end_time is not None
    one(exporter, "publish after")


async def test_jetstream_publish_and_consume_are_linked(
    nats_url: str, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    done = trio.Event()

    async def handle(msg: trionats.JsMsg) -> None:
        done.set()

    async with trionats.open_connection(nats_url, tracing=provider) as nc:
        js = nc.jetstream()
        await js.add_stream("T", ["t.>"])
        await js.add_consumer("T", "c")
        await js.publish("t.one", b"x", msg_id="m-1")
        async with open_subscriber(nc) as subscriber:
            await subscriber.start_jetstream("T", "c", handle)
            with trio.fail_after(10):
                await done.wait()
    publish = one(exporter, "request t.one")  # a JetStream publish is a request
    process = one(exporter, "process T/c")
    assert_child(process, publish)
    attributes = dict(process.attributes or {})
    assert attributes["messaging.destination.subscription.name"] == "c"
    assert attributes["messaging.destination.name"] == "t.one"
    # Acknowledgements get no span of their own.
    assert not [s for s in exporter.get_finished_spans() if "$JS.ACK" in s.name]


async def test_tracing_off_adds_no_header_and_no_span(
    nats_url: str, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    # No global provider in this process: the automatic mode is off.
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    async with (
        trionats.open_connection(nats_url) as auto,
        trionats.open_connection(nats_url, tracing=False) as off,
        trionats.open_connection(nats_url, tracing=provider) as on,
        trionats.open_connection(nats_url, tracing=False) as raw,
    ):
        assert (auto.tracing, off.tracing, on.tracing) == (False, False, True)
        async with (
            raw.subscribe("wire.>") as sub,
            raw.subscribe("svc") as svc,
            trio.open_nursery() as nursery,
        ):

            async def respond() -> None:
                async for msg in svc:
                    assert msg.headers is None  # the request carried no trace context
                    await msg.respond(b"ok")

            nursery.start_soon(respond)
            await auto.publish("wire.auto", b"a")
            await off.publish("wire.off", b"b")
            await off.publish("wire.off.h", b"c", headers={"k": "v"})
            await on.publish("wire.on", b"d")
            assert (await auto.request("svc", b"", timeout=5)).data == b"ok"
            assert (await off.request("svc", b"", timeout=5)).data == b"ok"
            got = {}
            with trio.fail_after(10):
                for _ in range(4):
                    msg = await sub.next_msg()
                    got[msg.subject] = msg.headers
            nursery.cancel_scope.cancel()
    assert got["wire.auto"] is None
    assert got["wire.off"] is None
    assert got["wire.off.h"] == {"k": "v"}
    assert got["wire.on"] is not None
    assert set(got["wire.on"]) >= {"traceparent"}
    assert [s.name for s in exporter.get_finished_spans()] == ["publish wire.on"]


async def test_bad_tracing_option(nats_url: str) -> None:
    with pytest.raises(TypeError, match=r"tracing must be .* got str: 'yes'"):
        async with trionats.open_connection(nats_url, tracing="yes"):
            pass  # pragma: no cover


_PUBLISHER = textwrap.dedent(
    """
    import json, sys
    import trio
    import trionats
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)  # the automatic mode picks it up


    async def main() -> None:
        async with trionats.open_connection(sys.argv[1]) as nc:
            assert nc.tracing
            await nc.publish("cross.process", b"hello")
        (span,) = exporter.get_finished_spans()
        ctx = span.get_span_context()
        print(json.dumps({"name": span.name, "trace": ctx.trace_id, "span": ctx.span_id}))


    trio.run(main)
    """
)


async def test_parent_and_child_in_two_processes(
    nats_url: str, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    handled = trio.Event()

    async def handle(msg: trionats.Msg) -> None:
        handled.set()

    async with (
        trionats.open_connection(nats_url, tracing=provider) as nc,
        open_subscriber(nc) as subscriber,
    ):
        await subscriber.start("cross.>", handle)
        with trio.fail_after(60):
            done = await trio.run_process(
                [sys.executable, "-c", _PUBLISHER, nats_url],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},  # this trionats
            )
            assert done.returncode == 0, done.stderr.decode()
            await handled.wait()
    published = json.loads(done.stdout)
    assert published["name"] == "publish cross.process"
    process = one(exporter, "process cross.>")
    assert process.context is not None
    assert process.parent is not None
    assert process.context.trace_id == published["trace"]
    assert process.parent.span_id == published["span"]


_NEVER_IMPORTED = textwrap.dedent(
    """
    import sys
    import trio
    import trionats


    async def main() -> None:
        async with trionats.open_connection(sys.argv[1]) as nc:
            assert not nc.tracing
            await nc.publish("plain", b"x")
        assert not [m for m in sys.modules if m.startswith("opentelemetry")], "imported"
        print("ok")


    trio.run(main)
    """
)


async def test_an_application_without_opentelemetry_imports_nothing(nats_url: str) -> None:
    with trio.fail_after(60):
        done = await trio.run_process(
            [sys.executable, "-c", _NEVER_IMPORTED, nats_url],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == b"ok\n"
