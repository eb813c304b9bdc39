"""Bearer tokens and who they stand for: the token file, the credentials a replica issues, new tokens.

Token file (JSON):

    {"tokens": [{"name": "ops", "role": "admin", "sha256": "<hex>"},
                {"name": "acme-app", "role": "tenant", "tenant": "acme", "sha256": "<hex>"},
                {"name": "replica-0", "role": "service", "replica": "replica-0", "sha256": "<hex>"},
                {"name": "prometheus", "role": "metrics", "sha256": "<hex>"}],
     "adapters": {"demo-0": "acme"}}

The file stores sha256 hashes of tokens: the tokens are random 256-bit secrets, so a fast unsalted
hash is as safe as a slow one (no dictionary to try) and lets each call be checked with one lookup.
`adapters` gives standalone replicas (no manager) the owner of each `--lora-modules` adapter;
with a manager, the registry's `tenant` field is the owner.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from loraserve.names import ID_RE

ADMIN, TENANT, SERVICE, METRICS = "admin", "tenant", "service", "metrics"
ROLES = (ADMIN, TENANT, SERVICE, METRICS)
# The role of the credential a replica gave the manager at its join (never in a token file).
MANAGER = "manager"
# The header a bearer token travels in: `authorization: Bearer <token>`.
AUTHORIZATION = "authorization"
HEX64 = re.compile(r"^[0-9a-f]{64}\Z")
TOKEN_BYTES = 32


def hash_token(token: str) -> str:
    """The hex sha256 a token is stored as."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who a call comes from."""

    name: str  # the token's label, for logs
    role: str  # admin | tenant | service | metrics | manager
    tenant: str = ""  # the tenant's name, for role tenant
    replica: str = ""  # the one replica id a service token acts as ("" = read-only service)


class TokenTable:
    """Token hashes -> principals, and the standalone adapter ownership map."""

    def __init__(self, principals: dict[str, Principal], adapter_tenants: dict[str, str] | None = None):
        self._by_hash = dict(principals)
        self.adapter_tenants = dict(adapter_tenants or {})

    @classmethod
    def load(cls, path: str | Path) -> TokenTable:
        """Parse a token file; ValueError naming the file and the entry that is wrong."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"auth_tokens ({str(path)!r}) cannot be read as JSON: {e}") from e
        return cls.from_dict(raw, str(path))

    @classmethod
    def from_dict(cls, raw: dict, where: str = "tokens") -> TokenTable:
        if not isinstance(raw, dict) or not isinstance(raw.get("tokens"), list):
            raise ValueError(f"{where}: must be an object with a 'tokens' list")
        principals = {}
        for i, entry in enumerate(raw["tokens"]):
            at = f"{where}: tokens[{i}]"
            if not isinstance(entry, dict):
                raise ValueError(f"{at} must be an object")
            if "token" in entry:
                raise ValueError(f"{at} holds a plain token: store its sha256 instead (new-token prints it)")
            digest, role, tenant = entry.get("sha256", ""), entry.get("role"), entry.get("tenant", "")
            if not isinstance(digest, str) or not HEX64.match(digest):
                raise ValueError(f"{at}.sha256 must be 64 lower-case hex digits")
            if role not in ROLES:
                raise ValueError(f"{at}.role ({role!r}) must be one of {list(ROLES)}")
            if (role == TENANT) != bool(tenant) or (tenant and not ID_RE.match(str(tenant))):
                raise ValueError(
                    f"{at}.tenant ({tenant!r}) must be a tenant name exactly when role is tenant"
                )
            replica = entry.get("replica", "")
            if replica and (role != SERVICE or not isinstance(replica, str) or not ID_RE.match(replica)):
                raise ValueError(f"{at}.replica ({replica!r}) must be a replica id, on a service token only")
            if digest in principals:
                raise ValueError(f"{at} repeats the hash of another entry")
            principals[digest] = Principal(str(entry.get("name") or f"token-{i}"), role, tenant, replica)
        owners = raw.get("adapters", {})
        if not isinstance(owners, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and ID_RE.match(v) for k, v in owners.items()
        ):
            raise ValueError(f"{where}: 'adapters' must map adapter ids to tenant names")
        return cls(principals, owners)

    def authenticate(self, token: str | None) -> Principal | None:
        """The token's principal, or None for a missing or unknown token."""
        return self._by_hash.get(hash_token(token)) if token else None

    def __len__(self) -> int:
        return len(self._by_hash)


class IssuedCredentials:
    """Credentials issued at run time, accepted besides a token table: on a replica, the one it
    chose and gave the manager at its latest join (and the one before, so a command sent just
    before a rejoin still passes). `authenticate` gives the `manager` principal for them."""

    KEEP = 2

    def __init__(self, tokens: TokenTable | None = None, name: str = "manager"):
        self.tokens = tokens
        self.principal = Principal(name, MANAGER)
        self._hashes: list[str] = []

    def issue(self, token: str) -> None:
        """Accept `token` from now on (the oldest one kept stops working)."""
        if token and hash_token(token) not in self._hashes:
            self._hashes = [*self._hashes, hash_token(token)][-self.KEEP :]

    def authenticate(self, token: str | None) -> Principal | None:
        if token and hash_token(token) in self._hashes:
            return self.principal
        return self.tokens.authenticate(token) if self.tokens is not None else None


def new_token() -> str:
    """A fresh random bearer token (256 bits)."""
    return "lsk_" + secrets.token_urlsafe(TOKEN_BYTES)
