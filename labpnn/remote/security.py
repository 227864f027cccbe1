"""CurveZMQ keys and the allow-list (PROTOCOL.md §10), and the ``labpnn keys`` command.

Keys are ZeroMQ certificate files as ``zmq.auth.create_certificates`` writes them: ``NAME.key``
(public, safe to copy to the server's ``authorized/`` directory) and ``NAME.key_secret`` (secret,
mode 0600). Wherever a key is accepted, a path to such a file or the 40-character Z85 key itself
(``bytes`` or ``str``) will do.

Server layout for ``labpnn serve --curve-keys DIR``::

    DIR/server.key_secret     the server's key pair     (labpnn keys server --dir DIR)
    DIR/server.key            given to clients
    DIR/authorized/*.key      public keys of the clients allowed in
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth

log = logging.getLogger(__name__)

KeySource = str | bytes | os.PathLike


@dataclass(frozen=True)
class ServerKeys:
    public: bytes
    secret: bytes
    authorized: Path  #: directory of allowed client public keys (*.key)


def _looks_like_z85(value: str | bytes) -> bool:
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
    return len(text) == 40 and "\n" not in text and not os.path.exists(text)


def load_public_key(source: KeySource) -> bytes:
    """A public key (Z85 bytes) from a key file (public or secret) or the key itself."""
    if isinstance(source, (str, bytes)) and _looks_like_z85(source):
        return source.encode("ascii") if isinstance(source, str) else source
    path = Path(os.fsdecode(source))
    if not path.is_file():
        raise FileNotFoundError(f"no key file at {path}")
    public, _ = zmq.auth.load_certificate(path)
    if not public:
        raise ValueError(f"{path} holds no public key")
    return public


def load_key_pair(source: KeySource | tuple[KeySource, KeySource]) -> tuple[bytes, bytes]:
    """(public, secret) from a ``.key_secret`` file or a (public, secret) pair of Z85 keys."""
    if isinstance(source, tuple):
        public, secret = source
        pub = public.encode() if isinstance(public, str) else public
        sec = secret.encode() if isinstance(secret, str) else secret
        if not (isinstance(pub, bytes) and isinstance(sec, bytes) and len(pub) == len(sec) == 40):
            raise ValueError("a key pair given as a tuple must be two 40-character Z85 keys (public, secret)")
        return pub, sec
    path = Path(os.fsdecode(source))
    if not path.is_file():
        raise FileNotFoundError(f"no key file at {path}")
    public, secret = zmq.auth.load_certificate(path)
    if not secret:
        raise ValueError(f"{path} holds no secret key (use the .key_secret file)")
    return public, secret


def server_keys(secret_key_file: KeySource, authorized_dir: KeySource) -> ServerKeys:
    public, secret = load_key_pair(secret_key_file)
    authorized = Path(os.fsdecode(authorized_dir))
    if not authorized.is_dir():
        raise FileNotFoundError(f"authorized keys directory {authorized} does not exist")
    if not list(authorized.glob("*.key")):
        log.warning("no client keys (*.key) in %s: nobody will be let in", authorized)
    return ServerKeys(public, secret, authorized)


def server_keys_from_dir(keys_dir: KeySource) -> ServerKeys:
    """``DIR/server.key_secret`` and ``DIR/authorized/`` (the ``--curve-keys DIR`` layout)."""
    root = Path(os.fsdecode(keys_dir))
    return server_keys(root / "server.key_secret", root / "authorized")


def make_curve_server(sock: zmq.Socket, keys: ServerKeys) -> None:
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_server = True


def start_authenticator(context: zmq.Context, keys: ServerKeys) -> Any:
    """A running ``ThreadAuthenticator`` admitting only the allow-listed client keys. Start it
    before binding; ``stop()`` it after closing the sockets."""
    from zmq.auth.thread import ThreadAuthenticator

    auth = ThreadAuthenticator(context, log=logging.getLogger("labpnn.auth"))
    auth.start()
    auth.configure_curve(domain="*", location=str(keys.authorized))
    return auth


def allow_list_signature(authorized: Path) -> tuple:
    """What identifies the allow-list's content: (name, mtime, size) of every ``*.key`` in it; the
    server re-reads the directory when this changes (None if it cannot be read)."""
    try:
        with os.scandir(authorized) as entries:
            return tuple(sorted((e.name, e.stat().st_mtime_ns, e.stat().st_size) for e in entries
                                if e.name.endswith(".key") and e.is_file()))
    except OSError:
        return None


def make_curve_client(sock: zmq.Socket, server_public_key: KeySource,
                      client_keys: KeySource | tuple[KeySource, KeySource] | None = None) -> bytes:
    """Configure ``sock`` as a CURVE client; an ephemeral key pair is made if ``client_keys`` is
    None (it is only let in by a server that allows any key). Returns the client public key."""
    server_public = load_public_key(server_public_key)
    if client_keys is None:
        public, secret = zmq.curve_keypair()
    else:
        public, secret = load_key_pair(client_keys)
    sock.curve_serverkey = server_public
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    return public


def create_key_pair(name: str, directory: KeySource = ".") -> tuple[Path, Path]:
    """Write ``NAME.key`` and ``NAME.key_secret`` (0600) in ``directory``; returns their paths."""
    root = Path(os.fsdecode(directory))
    root.mkdir(parents=True, exist_ok=True)
    for suffix in (".key", ".key_secret"):
        if (root / f"{name}{suffix}").exists():
            raise FileExistsError(f"{root / (name + suffix)} exists; not overwriting a key")
    public, secret = zmq.auth.create_certificates(root, name)
    os.chmod(secret, 0o600)
    return Path(public), Path(secret)


def cli_keys(parser):
    parser.add_argument("name", help="key name: writes NAME.key (public) and NAME.key_secret (secret)")
    parser.add_argument("--dir", default=".", help="directory to write the key files in (default: .)")

    def handler(args) -> int:
        try:
            public, secret = create_key_pair(args.name, args.dir)
        except (FileExistsError, OSError) as exc:
            print(f"labpnn keys: {exc}")
            return 2
        print(f"public key: {public}  (give it to the server's authorized/ directory, or to clients)")
        print(f"secret key: {secret}  (keep it private)")
        return 0

    return handler
