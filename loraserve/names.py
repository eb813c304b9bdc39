"""Names every process agrees on: the syntax of ids and the request headers routing reads."""

from __future__ import annotations

import re
import uuid

# An adapter, alias, replica or tenant id: no ':' (the Redis key separator), no spaces. `\Z`, not
# `$`: `$` also matches before a trailing newline, which would let "acme\n" pass for an id.
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/@+-]{0,127}\Z")
# The two files of a PEFT adapter directory.
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# Request header carrying the id every log line and message of one request names.
REQUEST_ID_HEADER = "x-request-id"


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


# Request header naming the tenant routing rules match on (set from the token when auth is on).
TENANT_HEADER = "x-tenant"
# Request header whose value an alias's variant choice sticks to.
REQUEST_KEY_HEADER = "x-request-key"
# Request header carrying the replica the front door's endpoint picker chose ("ip:port[,ip:port...]",
# first choice first). Envoy strips any client-sent value before the picker sets it.
DESTINATION_HEADER = "x-gateway-destination-endpoint"
# Request header naming the adapter: the picker sets it (clients may too); Envoy's Maglev hash
# falls back to it when the picker is down.
ADAPTER_HEADER = "x-adapter-id"
