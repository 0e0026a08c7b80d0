"""The multipart reader: the same parts however the body is cut into chunks, as python-multipart
reads them, and a 400 for each way the framing can be wrong."""

import pytest
from hypothesis import given
from hypothesis import strategies as st
from python_multipart.multipart import MultipartParser

from service.errors import BadRequest
from service.frontend.multipart import MultipartReader

BOUNDARY = b"b0undary"


def _body(parts: list[tuple[bytes, bytes]], preamble: bytes = b"", epilogue: bytes = b"") -> bytes:
    """parts: (header block, data) pairs."""
    framed = b"".join(b"--" + BOUNDARY + b"\r\n" + headers + b"\r\n\r\n" + data + b"\r\n" for headers, data in parts)
    return preamble + framed + b"--" + BOUNDARY + b"--\r\n" + epilogue


def _chunks(data: bytes, size: int) -> list[bytes]:
    return [data[start : start + size] for start in range(0, len(data), size)]


def _read_pieces(pieces: list[bytes], max_header_bytes: int = 1024) -> list[tuple[dict[bytes, bytes], bytes, int]]:
    parts: list[tuple[dict[bytes, bytes], bytes, int]] = []
    reader = MultipartReader(BOUNDARY, max_header_bytes, lambda *part: parts.append(part))
    for piece in pieces:
        reader.write(piece)
    reader.close()
    return parts


def _read(body: bytes, chunk: int, max_header_bytes: int = 1024) -> list[tuple[dict[bytes, bytes], bytes, int]]:
    return _read_pieces(_chunks(body, chunk), max_header_bytes)


def _python_multipart(body: bytes) -> list[bytes]:
    parts: list[bytes] = []
    data = bytearray()

    def on_data(buffer: bytes, start: int, end: int) -> None:
        data.extend(buffer[start:end])

    def on_end() -> None:
        parts.append(bytes(data))
        data.clear()

    parser = MultipartParser(BOUNDARY, {"on_part_data": on_data, "on_part_end": on_end})
    parser.write(body)
    parser.finalize()
    return parts


FILE = b'Content-Disposition: form-data; name="file"; filename="a.jpg"\r\nContent-Type: image/jpeg'
# Image-like data: CRs, LFs, dashes and near-misses of the delimiter, which python-multipart handles
# byte by byte and a search must not mistake for the boundary.
NEAR_MISSES = b"\r\n\r\r\n-\r\n--\r\n--b0undar\r\n--b0undarY--" + bytes(range(256))


@pytest.mark.parametrize("chunk", [1, 2, 5, 13, 64, 1 << 20])
def test_parts_are_the_same_however_the_body_is_cut(chunk):
    parts = [(FILE, NEAR_MISSES * 3), (b'Content-Disposition: form-data; name="top_k"', b"3"), (FILE, b"")]
    body = _body(parts)
    read = _read(body, chunk)
    assert [(headers[b"content-disposition"], data) for headers, data, _ in read] == [
        (b'form-data; name="file"; filename="a.jpg"', NEAR_MISSES * 3),
        (b'form-data; name="top_k"', b"3"),
        (b'form-data; name="file"; filename="a.jpg"', b""),
    ]
    assert read[0][0][b"content-type"] == b"image/jpeg"
    # Each part ends where the CRLF of the delimiter after it starts.
    delimiter, ends = b"\r\n--" + BOUNDARY, []
    while (found := body.find(delimiter, ends[-1] + 1 if ends else 0)) >= 0:
        ends.append(found)
    assert [through for _, _, through in read] == ends


def test_preamble_epilogue_padding_and_a_part_without_headers():
    body = _body([(FILE, b"x")], preamble=b"ignored\r\n", epilogue=b"also ignored")
    body = body.replace(b"--" + BOUNDARY + b"\r\n", b"--" + BOUNDARY + b" \t\r\n")
    body = body.replace(b"--" + BOUNDARY + b"--", b"--" + BOUNDARY + b"\r\n\r\nbare\r\n--" + BOUNDARY + b"--")
    assert [(headers, data) for headers, data, _ in _read(body, 3)] == [
        ({b"content-disposition": b'form-data; name="file"; filename="a.jpg"', b"content-type": b"image/jpeg"}, b"x"),
        ({}, b"bare"),
    ]


@given(
    st.lists(st.binary(max_size=300).filter(lambda data: b"\r\n--" + BOUNDARY not in data), max_size=4),
    st.integers(min_value=1, max_value=400),
)
def test_it_reads_what_python_multipart_reads(datas, chunk):
    body = _body([(FILE, data) for data in datas])
    assert [data for _, data, _ in _read(body, chunk)] == _python_multipart(body)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"--" + BOUNDARY + b"\r\n" + FILE + b"\r\n\r\nabc", "ended before its closing boundary"),
        (b"no boundary at all", "ended before its closing boundary"),
        (b"--" + BOUNDARY + b"x\r\n" + FILE + b"\r\n\r\n\r\n--" + BOUNDARY + b"--", "no CRLF after a boundary"),
        (b"--" + BOUNDARY + b"\r\nno colon\r\n\r\n\r\n--" + BOUNDARY + b"--", "header line"),
        (b"--" + BOUNDARY + b"\r\nBad Name: x\r\n\r\n\r\n--" + BOUNDARY + b"--", "header line"),
        (b"--" + BOUNDARY + b"\r\n" + b"X-Pad: " + b"a" * 2000 + b"\r\n\r\n", "headers exceed 1024 bytes"),
        (b"--" + BOUNDARY + b"\r\n" + b"X-Pad: " + b"a" * 2000, "headers exceed 1024 bytes"),
    ],
)
def test_broken_framing_is_a_bad_request(body, message):
    with pytest.raises(BadRequest, match=message):
        _read(body, 7)


def test_a_boundary_longer_than_the_rfc_allows_is_refused():
    with pytest.raises(BadRequest, match="1 to 70 characters"):
        MultipartReader(b"x" * 71, 1024, lambda *part: None)


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 1 << 20])
def test_the_part_header_bound_is_exact_wherever_the_chunks_cut(chunk):
    """Headers of exactly the bound pass, one byte more fails, even while the CRLFCRLF after them
    is cut short at a chunk's end."""
    prefix = b"X-Pad: "
    exact = prefix + b"a" * (1024 - len(prefix))
    body = _body([(exact, b"x")])
    for cut in range(len(body) - 12):  # a cut at every place before the data, then chunks
        read = _read_pieces(_chunks(body[:cut], chunk) + _chunks(body[cut:], chunk))
        assert [data for _, data, _ in read] == [b"x"]
    with pytest.raises(BadRequest, match="headers exceed 1024 bytes"):
        _read(_body([(exact + b"a", b"x")]), chunk)
