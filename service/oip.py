"""Open Inference Protocol (KServe v2 / Triton REST) bodies, including the binary tensor extension.

With the extension, the JSON header is followed by raw tensor bytes; the header's length is in
`Inference-Header-Content-Length`, and each tensor's size in its `binary_data_size` parameter.
BYTES elements are each prefixed by their length as a 4-byte little-endian integer.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass, field

import numpy as np

from service.errors import BadRequest

HEADER_LENGTH = "Inference-Header-Content-Length"
IMAGE_INPUT = "image"  # BYTES: one encoded image per element, decoded by the server
TENSOR_INPUT = "pixel_values"  # FP32 (N, C, H, W), already preprocessed as the manifest says
PROBABILITIES_OUTPUT = "probabilities"


@dataclass
class InferRequest:
    id: str | None
    input_name: str
    images: list[bytes] = field(default_factory=list)
    tensor: np.ndarray | None = None
    binary_outputs: bool = False
    classification: int = 0  # top-k label strings instead of probabilities, when > 0


def _parse_header(body: bytes, header_length: str | None) -> tuple[dict, bytes]:  # type: ignore[type-arg]
    try:
        size = int(header_length) if header_length is not None else len(body)
    except ValueError:
        raise BadRequest(f"{HEADER_LENGTH} is not an integer") from None
    if not 0 < size <= len(body):
        raise BadRequest(f"{HEADER_LENGTH} {size} does not fit a body of {len(body)} bytes")
    try:
        header = json.loads(body[:size])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"inference request header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise BadRequest("inference request must be a JSON object")
    return header, body[size:]


def _split_bytes(raw: bytes, count: int) -> list[bytes]:
    elements, offset = [], 0
    for _ in range(count):
        if offset + 4 > len(raw):
            raise BadRequest("BYTES tensor ends inside an element's length prefix")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise BadRequest("BYTES tensor element runs past the tensor's data")
        elements.append(raw[offset : offset + length])
        offset += length
    if offset != len(raw):
        raise BadRequest("BYTES tensor holds more data than its shape says")
    return elements


def parse_infer_request(body: bytes, header_length: str | None) -> InferRequest:
    header, binary = _parse_header(body, header_length)
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise BadRequest(f"send exactly one input: {IMAGE_INPUT!r} (BYTES) or {TENSOR_INPUT!r} (FP32)")
    spec = inputs[0]
    name, datatype, shape = spec.get("name"), spec.get("datatype"), spec.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise BadRequest("input shape must be a list of non-negative integers")
    count = math.prod(shape)
    size = (spec.get("parameters") or {}).get("binary_data_size")
    if size is not None and size != len(binary):
        raise BadRequest(f"binary_data_size {size} does not match the {len(binary)} bytes after the header")
    outputs = header.get("outputs") or []
    request_binary = bool((header.get("parameters") or {}).get("binary_data_output", False))
    output_params = [o.get("parameters") or {} for o in outputs if isinstance(o, dict)]
    for output in outputs:
        if not isinstance(output, dict) or output.get("name") != PROBABILITIES_OUTPUT:
            raise BadRequest(f"the only output is {PROBABILITIES_OUTPUT!r}")
    request = InferRequest(
        id=header.get("id"),
        input_name=str(name),
        binary_outputs=any(p.get("binary_data", False) for p in output_params) or request_binary,
        classification=max((int(p.get("classification", 0)) for p in output_params), default=0),
    )
    if name == IMAGE_INPUT:
        if datatype != "BYTES" or len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
            raise BadRequest(f"{IMAGE_INPUT!r} must be BYTES with shape [N] or [N, 1]")
        if size is not None:
            request.images = _split_bytes(binary, count)
        else:
            data = spec.get("data")
            if not isinstance(data, list) or len(data) != count or not all(isinstance(d, str) for d in data):
                raise BadRequest(f"{IMAGE_INPUT!r} JSON data must be {count} base64 strings")
            try:
                request.images = [base64.b64decode(d, validate=True) for d in data]
            except (binascii.Error, ValueError):
                raise BadRequest(f"{IMAGE_INPUT!r} JSON data must be base64 (or send it as binary data)") from None
    elif name == TENSOR_INPUT:
        if datatype != "FP32" or len(shape) != 4:
            raise BadRequest(f"{TENSOR_INPUT!r} must be FP32 with shape [N, C, H, W]")
        if size is not None:
            if size != 4 * count:
                raise BadRequest(f"FP32 tensor of shape {shape} needs {4 * count} bytes, got {size}")
            request.tensor = np.frombuffer(binary, dtype="<f4").reshape(shape).astype(np.float32)
        else:
            try:
                request.tensor = np.asarray(spec.get("data"), dtype=np.float32).reshape(shape)
            except (TypeError, ValueError):
                raise BadRequest(f"{TENSOR_INPUT!r} data does not hold {count} numbers") from None
    else:
        raise BadRequest(f"unknown input {name!r}: use {IMAGE_INPUT!r} (BYTES) or {TENSOR_INPUT!r} (FP32)")
    if count == 0:
        raise BadRequest("the input holds no images")
    return request


def _bytes_tensor(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def encode_infer_response(
    request: InferRequest, model_name: str, probabilities: np.ndarray, labels: list[str]
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary data follows it."""
    if request.classification:
        k = min(request.classification, probabilities.shape[1])
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
        # Triton's classification extension: "<score>:<index>:<label>", best first.
        rows = [
            [f"{p[i]:.6f}:{i}:{labels[i]}".encode() for i in row] for p, row in zip(probabilities, order, strict=True)
        ]
        output: dict[str, object] = {"name": PROBABILITIES_OUTPUT, "datatype": "BYTES", "shape": [len(rows), k]}
        flat = [element for row in rows for element in row]
        raw = _bytes_tensor(flat)
        json_data: list[object] = [element.decode() for element in flat]
    else:
        output = {"name": PROBABILITIES_OUTPUT, "datatype": "FP32", "shape": list(probabilities.shape)}
        raw = probabilities.astype("<f4").tobytes()
        json_data = probabilities.astype(np.float32).ravel().tolist()
    if request.binary_outputs:
        output["parameters"] = {"binary_data_size": len(raw)}
    else:
        output["data"] = json_data
    response: dict[str, object] = {"model_name": model_name, "model_version": "1", "outputs": [output]}
    if request.id is not None:
        response["id"] = request.id
    header = json.dumps(response).encode()
    if request.binary_outputs:
        return header + raw, len(header)
    return header, None
