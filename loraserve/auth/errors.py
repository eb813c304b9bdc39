"""Why a call is refused, whatever its transport: each transport maps these once (the gRPC
interceptor to status codes, the HTTP API to statuses)."""

from __future__ import annotations

from loraserve.errors import unknown_adapter_message


class AccessDenied(Exception):
    """A call is refused before it reaches the service; each transport maps the subclasses."""


class Unauthenticated(AccessDenied):
    """No token, or one the token table does not know (UNAUTHENTICATED, HTTP 401)."""


class PermissionDenied(AccessDenied):
    """The token's role may not make the call (PERMISSION_DENIED, HTTP 403)."""


class AccessUnknown(AccessDenied):
    """An adapter's owner could not be looked up (the manager is away: UNAVAILABLE, HTTP 503)."""


class Hidden(Exception):
    """A tenant named an adapter it does not own: answer as if it did not exist."""

    def __init__(self, adapter_id: str):
        super().__init__(adapter_id)
        self.adapter_id = adapter_id


class AdapterHidden(LookupError):
    """The default `not_found` error: an adapter a tenant may not see."""

    def __init__(self, adapter_id: str):
        super().__init__(unknown_adapter_message(adapter_id))
