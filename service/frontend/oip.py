"""Open Inference Protocol (KServe v2 / Triton REST) bodies, including the binary tensor extension.

With the extension, the JSON header is followed by raw tensor bytes; the header's length is in
`Inference-Header-Content-Length`, and each tensor's size in its `binary_data_size` parameter.
BYTES elements are each prefixed by their length as a 4-byte little-endian integer. The header is
read under the same budget as /classify's JSON (service/frontend/body.py).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.errors import BadRequest
from service.frontend.body import BodyLimits, decode_base64, last_line_of_defence, load_json

HEADER_LENGTH = "Inference-Header-Content-Length"
IMAGE_INPUT = "image"  # BYTES: one encoded image per element, decoded by the server
TENSOR_INPUT = "pixel_values"  # FP32 (N, C, H, W), already preprocessed as the manifest says
PROBABILITIES_OUTPUT = "probabilities"  # FP32 (N, classes): softmax scores, or top-k strings
EMBEDDING_OUTPUT = "embedding"  # FP32 (N, D): the final [class]-token vector
OUTPUTS = (PROBABILITIES_OUTPUT, EMBEDDING_OUTPUT)


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool
    classification: int = 0  # top-k "<score>:<index>:<label>" strings instead of probabilities, when > 0


@dataclass
class InferRequest:
    id: str | None
    outputs: list[RequestedOutput]
    images: list[bytes] = field(default_factory=list)
    tensor: np.ndarray | None = None  # (N, C, H, W) float32


def _parse_header(body: bytes, header_length: str | None, limits: BodyLimits) -> tuple[dict, bytes]:
    try:
        size = int(header_length) if header_length is not None else len(body)
    except ValueError:
        raise BadRequest(f"{HEADER_LENGTH} is not an integer") from None
    if not 0 < size <= len(body):
        raise BadRequest(f"{HEADER_LENGTH} {size} does not fit a body of {len(body)} bytes")
    header = load_json(body[:size], limits, "the inference request")
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


def _parameters(spec: dict, where: str) -> dict:
    parameters = spec.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise BadRequest(f"{where} parameters must be a JSON object")
    return parameters


def _flag(parameters: dict, name: str, default: bool) -> bool:
    value = parameters.get(name, default)
    if not isinstance(value, bool):
        raise BadRequest(f"the {name} parameter must be true or false")
    return value


def _requested_outputs(header: dict) -> list[RequestedOutput]:
    binary_default = _flag(_parameters(header, "request"), "binary_data_output", False)
    outputs = header.get("outputs")
    if outputs is None:  # as Triton does: every output when none is named
        return [RequestedOutput(name, binary_default) for name in OUTPUTS]
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise BadRequest("outputs must be a list of objects")
    requested = []
    for output in outputs:
        name = output.get("name")
        if name not in OUTPUTS:
            raise BadRequest(f"unknown output {name!r}: the outputs are {', '.join(OUTPUTS)}")
        parameters = _parameters(output, f"output {name!r}")
        classification = parameters.get("classification", 0)
        if type(classification) is not int or classification < 0:  # bool is an int to isinstance
            raise BadRequest("the classification parameter must be a non-negative integer")
        if classification and name != PROBABILITIES_OUTPUT:
            raise BadRequest(f"classification applies to {PROBABILITIES_OUTPUT!r} only")
        requested.append(RequestedOutput(name, _flag(parameters, "binary_data", binary_default), classification))
    return requested


def parse_infer_request(
    body: bytes, header_length: str | None, limits: BodyLimits, tensor_shape: tuple[int, int, int]
) -> InferRequest:
    """tensor_shape: the model's (C, H, W), which an FP32 input must have per image."""
    with last_line_of_defence():
        return _parse(body, header_length, limits, tensor_shape)


def _parse(
    body: bytes, header_length: str | None, limits: BodyLimits, tensor_shape: tuple[int, int, int]
) -> InferRequest:
    header, binary = _parse_header(body, header_length, limits)
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise BadRequest(f"send exactly one input: {IMAGE_INPUT!r} (BYTES) or {TENSOR_INPUT!r} (FP32)")
    spec = inputs[0]
    name, datatype, shape = spec.get("name"), spec.get("datatype"), spec.get("shape")
    if not isinstance(shape, list) or not shape or not all(type(d) is int and d >= 0 for d in shape):
        raise BadRequest("input shape must be a non-empty list of non-negative integers")
    images = shape[0]
    if images == 0:
        raise BadRequest("the input holds no images")
    limits.check_images(images)
    size = _parameters(spec, f"input {name!r}").get("binary_data_size")
    if size is not None and size != len(binary):
        raise BadRequest(f"binary_data_size {size} does not match the {len(binary)} bytes after the header")
    request = InferRequest(id=_request_id(header), outputs=_requested_outputs(header))
    if name == IMAGE_INPUT:
        if datatype != "BYTES" or shape not in ([images], [images, 1]):
            raise BadRequest(f"{IMAGE_INPUT!r} must be BYTES with shape [N] or [N, 1]")
        if size is not None:
            request.images = _split_bytes(binary, images)
        else:
            data = spec.get("data")
            if not isinstance(data, list) or len(data) != images or not all(isinstance(d, str) for d in data):
                raise BadRequest(f"{IMAGE_INPUT!r} JSON data must be {images} base64 strings")
            request.images = [decode_base64(d, f"{IMAGE_INPUT}[{i}]") for i, d in enumerate(data)]
    elif name == TENSOR_INPUT:
        expected = [images, *tensor_shape]
        if datatype != "FP32" or shape != expected:
            raise BadRequest(f"{TENSOR_INPUT!r} must be FP32 with shape [N, {', '.join(map(str, tensor_shape))}]")
        count = math.prod(shape)
        if size is not None:
            if size != 4 * count:
                raise BadRequest(f"FP32 tensor of shape {shape} needs {4 * count} bytes, got {size}")
            request.tensor = _finite(np.frombuffer(binary, dtype="<f4").reshape(shape).astype(np.float32))
        else:
            request.tensor = _finite(_json_numbers(spec.get("data"), shape))
    else:
        raise BadRequest(f"unknown input {name!r}: use {IMAGE_INPUT!r} (BYTES) or {TENSOR_INPUT!r} (FP32)")
    return request


def _request_id(header: dict) -> str | None:
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest("the request id must be a string")
    return request_id


def _json_numbers(data: object, shape: list[int]) -> np.ndarray:
    """FP32 JSON data, flat or nested row-major as the protocol allows; exactly the shape's count."""
    if not isinstance(data, list):
        raise BadRequest(f"{TENSOR_INPUT!r} JSON data must be a list of numbers")
    try:
        array = np.asarray(data, dtype=np.float32)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an integer too large for a float
        raise BadRequest(f"{TENSOR_INPUT!r} JSON data must hold numbers only, in a regular shape") from None
    if array.size != math.prod(shape):
        raise BadRequest(f"{TENSOR_INPUT!r} data holds {array.size} numbers; shape {shape} needs {math.prod(shape)}")
    return array.reshape(shape)


def _finite(tensor: np.ndarray) -> np.ndarray:
    if not np.isfinite(tensor).all():
        raise BadRequest(f"{TENSOR_INPUT!r} holds non-finite numbers (NaN or infinity)")
    return tensor


def _bytes_tensor(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def _top_k_strings(probabilities: np.ndarray, k: int, labels: list[str]) -> list[bytes]:
    """Triton's classification extension: "<score>:<index>:<label>", best first, k per image."""
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return [f"{p[i]:.6f}:{i}:{labels[i]}".encode() for p, row in zip(probabilities, order, strict=True) for i in row]


def encode_infer_response(
    request: InferRequest, model_name: str, values: dict[str, np.ndarray], labels: list[str]
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary data follows it.

    values: each output's (N, ...) float32 array, by name."""
    outputs: list[dict[str, object]] = []
    raws: list[bytes] = []
    json_data: list[Any]
    for wanted in request.outputs:
        array = values[wanted.name]
        if wanted.classification:
            k = min(wanted.classification, array.shape[1])
            elements = _top_k_strings(array, k, labels)
            output: dict[str, object] = {"name": wanted.name, "datatype": "BYTES", "shape": [len(array), k]}
            raw, json_data = _bytes_tensor(elements), [element.decode() for element in elements]
        else:
            output = {"name": wanted.name, "datatype": "FP32", "shape": list(array.shape)}
            raw, json_data = array.astype("<f4").tobytes(), array.astype(np.float32).ravel().tolist()
        if wanted.binary:
            output["parameters"] = {"binary_data_size": len(raw)}
            raws.append(raw)
        else:
            output["data"] = json_data
        outputs.append(output)
    response: dict[str, object] = {"model_name": model_name, "model_version": "1", "outputs": outputs}
    if request.id is not None:
        response["id"] = request.id
    try:
        header = json.dumps(response, allow_nan=False).encode()
    except ValueError:
        # Finite inputs far outside the preprocessed range overflow the graph; JSON has no NaN.
        raise BadRequest(
            f"the model's output for this {TENSOR_INPUT!r} is not finite, which JSON cannot carry: are the values"
            " preprocessed as the model's manifest says? (binary_data_output returns them as they are)"
        ) from None
    if raws:
        return header + b"".join(raws), len(header)
    return header, None
