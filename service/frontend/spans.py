"""What a traced request's span learns from the engine's answer (README, "Tracing")."""

from __future__ import annotations

from typing import TYPE_CHECKING

from opentelemetry import trace

if TYPE_CHECKING:  # the engine client calls this with its answer
    from service.frontend.engine_client import Answer


def annotate(answer: Answer) -> None:
    """The request's images and where their time went, on the current span if it records: one
    that answers "was it the queue or the model" without the metrics of every other request."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes(
            {
                "vit.images": len(answer.rows),
                "vit.preprocess_ms": answer.preprocess_s * 1000,
                "vit.queue_wait_ms": answer.queue_wait_s * 1000,
                "vit.inference_ms": answer.inference_s * 1000,
            }
        )
