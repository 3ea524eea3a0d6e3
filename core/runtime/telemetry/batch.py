"""The spans of one worker batch while tracing is on: a batch span (a new trace, linked
to every message's context, as the messaging conventions say for batch consumers) and
one span tree per image (its stages and its sends), each image's span linked back to
the batch."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

from core.runtime.telemetry.base import BatchTrace, Message
from core.runtime.telemetry.context import TRACEPARENT, KafkaHeaders
from core.runtime.telemetry.sdk import (
    annotate,
    carrier_of,
    extract,
    fail,
    process_attributes,
    send_attributes,
    traceparent_of,
)
from core.runtime.telemetry.stages import StageLog

if TYPE_CHECKING:
    from opentelemetry.trace import Span as OtelSpan
    from opentelemetry.trace import Tracer


class OtelBatch(BatchTrace):
    """A batch span (new trace, links to each message) and one span tree per image."""

    def __init__(self, tracer: Tracer, items: Sequence[Message], group: str) -> None:
        self._log = StageLog()
        self.stages = self._log
        self._tracer = tracer
        self._items = list(items)
        self._group = group
        self._start_ns = time.time_ns()
        self._spans: dict[int, OtelSpan] = {}
        self._sends: list[OtelSpan] = []
        self._first_send_ns: int | None = None

    def __enter__(self) -> BatchTrace:
        from opentelemetry.context import Context
        from opentelemetry.trace import Link, SpanKind, get_current_span

        contexts = [extract(carrier_of(item.headers)) for item in self._items]
        links = [
            Link(get_current_span(ctx).get_span_context(), {"messaging.kafka.offset": item.offset})
            for ctx, item in zip(contexts, self._items, strict=True)
            if get_current_span(ctx).get_span_context().is_valid
        ]
        topic = self._items[0].topic if self._items else ""
        self._batch = self._tracer.start_span(
            f"process {topic}",
            context=Context(),  # a root: the batch mixes images of many traces
            kind=SpanKind.CONSUMER,
            links=links,
            attributes={
                **process_attributes(topic),
                "messaging.batch.message_count": len(self._items),
                "messaging.consumer.group.name": self._group,
            },
            start_time=self._start_ns,
        )
        to_batch = [Link(self._batch.get_span_context())]
        for ctx, item in zip(contexts, self._items, strict=True):
            self._spans[id(item)] = self._tracer.start_span(
                f"process {item.topic}",
                context=ctx,
                kind=SpanKind.CONSUMER,
                links=to_batch,
                attributes={
                    **process_attributes(item.topic),
                    "messaging.destination.partition.id": str(item.partition),
                    "messaging.kafka.offset": item.offset,
                    "messaging.consumer.group.name": self._group,
                    "qrsight.request_id": item.request_id,
                },
                start_time=self._start_ns,
            )
        return self

    def headers(self, item: Message, result: Mapping[str, Any], topic: str) -> KafkaHeaders:
        from opentelemetry.trace import SpanKind, set_span_in_context

        parent = self._spans[id(item)]
        annotate(parent, result)
        send = self._tracer.start_span(
            f"send {topic}",
            context=set_span_in_context(parent),
            kind=SpanKind.PRODUCER,
            attributes={**send_attributes(topic), "qrsight.request_id": item.request_id},
        )
        self._sends.append(send)
        if self._first_send_ns is None:
            self._first_send_ns = time.time_ns()
        return [(TRACEPARENT, traceparent_of(send).encode())]

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        end_ns = time.time_ns()
        error = None if exc is None else type(exc).__name__
        for send in self._sends:
            if error:
                fail(send, error)
            send.end(end_ns)
        for item in self._items:
            self._stage_spans(self._spans[id(item)], self._log.of(item.job) if item.job else [])
        self._batch_stage_spans(end_ns, error)
        for span in [*self._spans.values(), self._batch]:
            if error:
                fail(span, error)
            span.end(end_ns)

    def _stage_spans(
        self, parent: OtelSpan, stages: Sequence[tuple[str, float, float, dict[str, Any]]]
    ) -> None:
        from opentelemetry.trace import set_span_in_context

        ctx = set_span_in_context(parent)
        for stage, start, end, attributes in stages:
            span = self._tracer.start_span(
                stage, context=ctx, attributes=attributes, start_time=self._log.ns(start)
            )
            span.end(self._log.ns(end))

    def _batch_stage_spans(self, end_ns: int, error: str | None) -> None:
        """The batch's own breakdown: each stage from its first start to its last end."""
        spans: dict[str, tuple[float, float]] = {}
        for entries in self._log.by_job.values():
            for stage, start, end, _ in entries:
                low, high = spans.get(stage, (start, end))
                spans[stage] = (min(low, start), max(high, end))
        self._stage_spans(self._batch, [(s, a, b, {}) for s, (a, b) in spans.items()])
        if self._first_send_ns is not None:
            from opentelemetry.trace import set_span_in_context

            send = self._tracer.start_span(
                "deliver",
                context=set_span_in_context(self._batch),
                attributes={"messaging.batch.message_count": len(self._sends)},
                start_time=self._first_send_ns,
            )
            if error:
                fail(send, error)
            send.end(end_ns)
