"""Where the picker reads a request's adapter: the gRPC Generate body, a JSON `model`, the header;
and a JSON body's `user`."""

from __future__ import annotations

import json

from endpoint_picker.extproc import GENERATE_PATH, read_request
from loraserve.v1 import inference_pb2

GRPC = {":path": GENERATE_PATH, "content-type": "application/grpc"}


def requested_adapter(headers: dict[str, str], body: bytes) -> str:
    return read_request(headers, body).adapter_id


def frame(message: bytes, compressed: int = 0) -> bytes:
    return bytes([compressed]) + len(message).to_bytes(4, "big") + message


def test_the_generate_body_names_the_adapter():
    body = frame(inference_pb2.GenerateRequest(adapter_id="sql-v2", text="hi").SerializeToString())
    assert requested_adapter(GRPC, body) == "sql-v2"
    assert requested_adapter(GRPC, frame(inference_pb2.GenerateRequest(text="hi").SerializeToString())) == ""


def test_the_header_is_used_when_the_body_names_none_or_cannot_be_read():
    headers = {**GRPC, "x-adapter-id": "from-header"}
    assert (
        requested_adapter(headers, frame(inference_pb2.GenerateRequest().SerializeToString()))
        == "from-header"
    )
    assert requested_adapter(headers, frame(b"\xff\xff\xff")) == "from-header"  # not a GenerateRequest
    assert requested_adapter(headers, frame(b"zz", compressed=1)) == "from-header"  # compressed: unread
    assert requested_adapter(headers, b"\x00\x00") == "from-header"  # truncated frame


def test_openai_style_json_names_the_model():
    headers = {":path": "/v1/chat/completions", "content-type": "application/json"}
    body = json.dumps({"model": "support-bot", "messages": []}).encode()
    assert requested_adapter(headers, body) == "support-bot"
    assert requested_adapter(headers, b"[1, 2]") == ""
    assert requested_adapter(headers, b"not json") == ""
    assert requested_adapter({**headers, "x-adapter-id": "h"}, json.dumps({"model": 3}).encode()) == "h"


def test_a_json_user_is_read_beside_the_model():
    headers = {":path": "/v1/completions", "content-type": "application/json"}
    assert read_request(headers, json.dumps({"model": "m", "user": "u-7"}).encode()) == ("m", "u-7")
    assert read_request(headers, json.dumps({"model": "m", "user": 7}).encode()) == ("m", "")
    assert read_request(GRPC, b"") == ("", "")
