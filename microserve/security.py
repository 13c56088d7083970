"""The cluster key: one shared secret from which every credential of a deployment derives.

    microserve keygen FILE             32 random bytes, hex, mode 0600
    --cluster-key FILE | $MICROSERVE_CLUSTER_KEY=FILE
        ├─ CURVE server keypair   engines' RPC ROUTER and KV-event PUB sockets (curve_server)
        ├─ CURVE client keypair   handles' DEALER, the router's SUB; the engines' ZAP handler
        │                         admits only this client key, so a peer without the file
        │                         cannot make a call nor read an event
        └─ KV signing key         HMAC of every KVAddr a receiver hands out (`kvapi.transfer.sign`):
                                  a sender writes only into addresses signed with it

Every key is derived (SHA-256 with a label) so one file is all a host needs. See docs/security.md.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import stat
from pathlib import Path

import zmq
import zmq.asyncio
from zmq.utils import z85

log = logging.getLogger(__name__)

ENV = "MICROSERVE_CLUSTER_KEY"
_ZAP_DOMAIN = "microserve"


class ClusterKeyError(ValueError):
    """A cluster key file is missing, unreadable or malformed."""


class ClusterKey:
    """A loaded cluster key (use `load` / `generate`)."""

    def __init__(self, secret: bytes, source: str = "") -> None:
        if len(secret) != 32:
            raise ClusterKeyError(f"a cluster key is 32 bytes, got {len(secret)}")
        self.source = source
        self._secret = secret
        self.server_secret = z85.encode(self._derive(b"curve-server"))
        self.server_public = zmq.curve_public(self.server_secret)
        self.client_secret = z85.encode(self._derive(b"curve-client"))
        self.client_public = zmq.curve_public(self.client_secret)
        self.kv_key = self._derive(b"kv-plane")
        # the KV store: mixed into every entry's namespace (another cluster never reads ours) and the
        # password of a Valkey/Redis tier that `launch` starts
        self.store_key = self._derive(b"kv-store")
        self.store_password = self._derive(b"kv-store-password").hex()
        # what `microserve engine --join` shows the gateway's admin API to add or remove itself
        self.join_token = self._derive(b"join").hex()

    def _derive(self, label: bytes) -> bytes:
        return hashlib.sha256(b"microserve-cluster-key/" + label + b"/" + self._secret).digest()

    def __repr__(self) -> str:  # NOTE: never the secret itself
        return f"ClusterKey({self.source or 'in memory'})"

    # -- files -----------------------------------------------------------------------------
    @classmethod
    def generate(cls) -> ClusterKey:
        return cls(secrets.token_bytes(32))

    def write(self, path: str | Path) -> Path:
        """Write the key to `path` (mode 0600, created exclusively: never overwrites a key)."""
        path = Path(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self._secret.hex() + "\n")
        self.source = str(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ClusterKey:
        path = Path(path)
        try:
            text = path.read_text().strip()
            mode = path.stat().st_mode
        except OSError as exc:
            raise ClusterKeyError(f"cannot read the cluster key {path}: {exc.strerror or exc}") from None
        try:
            secret = bytes.fromhex(text)
        except ValueError:
            secret = b""
        if len(secret) != 32:
            raise ClusterKeyError(f"{path} is not a cluster key (64 hex digits); make one with `microserve keygen`")
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("cluster key %s is readable by other users (mode %o): chmod 600 it", path, mode & 0o777)
        return cls(secret, str(path))

    # -- ZeroMQ ------------------------------------------------------------------------------
    def secure_server(self, sock: zmq.Socket) -> None:
        """Make `sock` a CURVE server whose peers must hold this key (see `authenticator`)."""
        sock.curve_server = True
        sock.curve_secretkey = self.server_secret
        sock.curve_publickey = self.server_public
        sock.zap_domain = _ZAP_DOMAIN.encode()

    def secure_client(self, sock: zmq.Socket) -> None:
        """Make `sock` a CURVE client of servers secured with this key (before `connect`)."""
        sock.curve_serverkey = self.server_public
        sock.curve_publickey = self.client_public
        sock.curve_secretkey = self.client_secret

    def authenticator(self, ctx: zmq.asyncio.Context):
        """Start the ZAP handler of `ctx` admitting only clients that hold this key."""
        from zmq.auth.asyncio import AsyncioAuthenticator

        allowed = self.client_public

        class _Only:
            def callback(self, domain: str, key: bytes) -> bool:
                ok = key == allowed
                if not ok:
                    log.warning("refused a ZeroMQ peer without the cluster key")
                return ok

        auth = AsyncioAuthenticator(ctx, log=logging.getLogger("microserve.zap"))
        auth.start()
        auth.configure_curve_callback(domain=_ZAP_DOMAIN, credentials_provider=_Only())
        return auth


def resolve(key: ClusterKey | str | Path | None) -> ClusterKey | None:
    """A `ClusterKey` from itself, a file, or (None) `$MICROSERVE_CLUSTER_KEY` if set."""
    if isinstance(key, ClusterKey):
        return key
    if key is None:
        key = os.environ.get(ENV) or None
        if key is None:
            return None
    return ClusterKey.load(key)


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or `tcp://host:port`) is on the loopback interface only."""
    import ipaddress

    h = host.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]") if "://" in host else host.strip("[]")
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False
