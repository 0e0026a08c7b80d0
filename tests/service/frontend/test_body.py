"""The body budget on its own: JSON checked before it is parsed, and the last line of defence."""

import asyncio
import logging
import time

import pytest

from service.errors import BadRequest, PayloadTooLarge
from service.frontend.body import BodyClock, BodyLimits, last_line_of_defence, load_json
from service.logs import ContextFilter, request_id

LIMITS = BodyLimits(
    max_bytes=1 << 20,
    max_images=4,
    max_form_fields=2,
    max_part_header_bytes=1024,
    max_json_depth=4,
    max_json_values=10,
    max_json_strings=6,
)


def test_json_within_the_budget_parses():
    assert load_json(b'{"images": ["a", "b"], "x": [[1, 2], {"y": 3}]}', LIMITS, "it") == {
        "images": ["a", "b"],
        "x": [[1, 2], {"y": 3}],
    }


@pytest.mark.parametrize(
    "body",
    [b'{"a": "[[[[[[["}', b'{"a": "x\\"[[[[[[{{"}', b'{"a": "\\\\\\"[[[[[["}', b'["]]]]]]", [[[1]]]]'],
    ids=["brackets", "after an escaped quote", "after an escaped backslash and quote", "closers"],
)
def test_brackets_inside_strings_are_not_structure(body):
    """Not counted against the depth: a valid body is not refused for what its strings hold."""
    assert load_json(body, LIMITS, "it") is not None


@pytest.mark.parametrize(
    ("body", "error", "message"),
    [
        (b"[[[[[1]]]]]", BadRequest, "deeper than 4"),
        (b"[" * 100_000 + b"]" * 100_000, BadRequest, "deeper than 4"),
        (b"[" + b"1," * 10 + b"1]", PayloadTooLarge, "more than 10 JSON values"),
        (b"[[],[],[],[],[],[],[],[],[],[],[]]", PayloadTooLarge, "more than 10 JSON values"),
        # Closers inside strings cannot hide real depth, whatever escapes come before them.
        (b'["]]]]", ["]]]]", ["]]]]", ["]]]]", [["]]]]"]]]]]]', BadRequest, "deeper than 4"),
        (b'["x\\\\", [[[[1]]]], "]]]]"]', BadRequest, "deeper than 4"),
        (b'["", "", "", "", "", "", ""]', PayloadTooLarge, "more than 6 JSON strings"),
        (b'"\\"' * 200_000, PayloadTooLarge, "more than 6 JSON strings"),
        (b"[" + b"1" * 5000 + b"]", BadRequest, "not valid JSON"),  # past Python's 4,300 digits
        (b'{"a": \xff}', BadRequest, "not valid JSON"),
        (b"[1, 2", BadRequest, "not valid JSON"),
    ],
)
def test_json_over_the_budget_or_broken_is_refused_before_it_is_built(body, error, message):
    with pytest.raises(error, match=message):
        load_json(body, LIMITS, "it")


def test_a_list_of_encoded_images_may_hold_two_commas_an_image_whatever_the_tensor_budget():
    """The OIP's budget allows a full FP32 request (here 100,000 values); {"images": [...]} needs
    a value and at most a data URL's comma an image, and gets no more than that and the slack."""
    tensors = BodyLimits(1 << 24, 4, 2, 1024, 4, max_json_values=100_000, max_json_strings=4096)
    images = tensors.for_encoded_images()
    data_urls = b'{"images": [' + b", ".join([b'"data:image/jpeg;base64,AAAA"'] * 4) + b"]}"
    assert len(load_json(data_urls, images, "it")["images"]) == 4
    empty_strings = b'{"images": [' + b",".join([b'""'] * 2000) + b"]}"
    assert len(load_json(empty_strings, tensors, "it")["images"]) == 2000
    with pytest.raises(PayloadTooLarge, match=f"more than {images.max_json_values} JSON values"):
        load_json(empty_strings, images, "it")
    assert LIMITS.for_encoded_images().max_json_values == LIMITS.max_json_values  # never looser


def test_the_unforeseen_becomes_a_400_logged_with_the_request_id(caplog):
    caplog.handler.addFilter(ContextFilter("frontend-0"))  # as configure_logging does
    token = request_id.set("req-42")
    try:
        with (
            caplog.at_level(logging.ERROR),
            pytest.raises(BadRequest, match="could not be read"),
            last_line_of_defence(),
        ):
            raise ZeroDivisionError("a parser bug")
    finally:
        request_id.reset(token)
    (record,) = caplog.records
    assert record.exc_info[0] is ZeroDivisionError
    assert record.request_id == "req-42"


def _run_clock(
    events: list[tuple[float, int | None]], grace_s: float = 0.1, deadline_s: float = 5
) -> tuple[bool, bool]:
    """Play (sleep seconds, bytes so far, or None to stop the clock) under a BodyClock of 1,000
    bytes/s: (whether its timeout fired, whether the rate was what ran out)."""

    async def play() -> tuple[bool, bool]:
        clock = BodyClock(time.monotonic() + deadline_s, 1000, grace_s)
        try:
            async with clock.timeout:
                for pause, total in events:
                    await asyncio.sleep(pause)
                    if total is None:
                        clock.stop()
                    else:
                        clock.received(total)
        except TimeoutError:
            return True, clock.rate_ran_out()
        return False, False

    return asyncio.run(play())


def test_a_body_clock_gives_a_grace_then_holds_the_rate_and_lets_the_work_after_the_body_run_on():
    assert _run_clock([(0.3, None)]) == (True, True)  # nothing arrived within the grace
    assert _run_clock([(0.05, 300), (0.2, 500), (0.2, None)]) == (False, False)  # 500 bytes cover 0.5 s
    assert _run_clock([(0.05, 100), (0.25, None)]) == (True, True)  # 100 bytes cover 0.1 s only
    assert _run_clock([(0.05, None), (0.4, None)]) == (False, False)  # the body is in: the deadline alone
    assert _run_clock([(0.3, None)], grace_s=10) == (False, False)  # within the grace, any rate will do
    assert _run_clock([(0.3, None)], grace_s=10, deadline_s=0.1) == (True, False)  # the deadline came first
