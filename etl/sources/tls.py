"""TLS for DICOM over the network (the secure transport connection profile, TLS 1.2 or
later): the listener's server context, and a client context for pulling from a PACS."""

from __future__ import annotations

import ssl
from pathlib import Path


class _LazyHandshake(ssl.SSLContext):
    """A server context whose sockets do their TLS handshake when first used, not when
    accepted: pynetdicom wraps each accepted socket in its one accepting thread, where a
    client that connects and stays silent would hold up every other sender (measured:
    the next association waited for it for ever). The listener does the handshake in the
    association's own thread (:meth:`etl.sources.listen.Listener._on_connect`)."""

    def wrap_socket(self, sock, server_side=False, do_handshake_on_connect=True, **kwargs):
        return super().wrap_socket(sock, server_side=server_side,
                                   do_handshake_on_connect=False if server_side
                                   else do_handshake_on_connect, **kwargs)


def server_context(cert: Path | str, key: Path | str | None = None,
                   ca: Path | str | None = None) -> ssl.SSLContext:
    """A listener's TLS (DICOM's secure transport, TLS 1.2 or later): our certificate
    ``cert`` and its private ``key`` (PEM; None: in ``cert``); with ``ca``, a sender must
    present a certificate that one of the CA certificates in that file signed."""
    ctx = _LazyHandshake(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_cert(ctx, cert, key)
    if ca is not None:
        _load_ca(ctx, ca, "the senders' certificates")
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(ca: Path | str | None = None, cert: Path | str | None = None,
                   key: Path | str | None = None) -> ssl.SSLContext:
    """Our side of a TLS association with a PACS: its certificate checked against ``ca``
    (PEM CA certificates; None: the system's) and its host name; with ``cert``, ours is
    presented (mutual TLS; ``key`` None: in ``cert``)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca is not None:
        _load_ca(ctx, ca, "the PACS' certificate")
    if cert is not None:
        _load_cert(ctx, cert, key)
    return ctx


def certificate_names(cert: dict) -> list[str]:
    """The names a verified peer certificate (``SSLSocket.getpeercert()``) gives its
    holder: the subject's common names, then its subject alternative names (DNS names, IP
    addresses, e-mail addresses, URIs), as written in it."""
    names = [value for rdn in cert.get("subject", ()) for key, value in rdn
             if key == "commonName"]
    names += [value.strip() for _, value in cert.get("subjectAltName", ())]
    return names


def check_name_pattern(pattern: str) -> str:
    """``pattern`` (``lake listen --allow-cert``) if it is one: a name, or ``*.`` and a
    domain (one label of any DNS name in it); ValueError if not."""
    text = pattern.strip()
    wild = text.startswith("*.")
    if not text or "*" in (text[2:] if wild else text) or (wild and not text[2:].strip(".")):
        raise ValueError(f"{pattern!r} is not a certificate name: expected a common name or "
                         "subject alternative name (e.g. ct1.radiology.example.org, "
                         "\"CT Scanner 1\", 10.1.2.3) or *.DOMAIN")
    return text


def name_matches(pattern: str, name: str) -> bool:
    """Whether a certificate's ``name`` is the one ``pattern`` allows: equal, ignoring case
    (IP addresses as addresses); ``*.DOMAIN`` matches a name of one more label than
    DOMAIN (``ct1.DOMAIN``, not ``DOMAIN`` nor ``a.ct1.DOMAIN``), as TLS host names do."""
    import ipaddress

    pattern, name = pattern.casefold(), name.casefold()
    if pattern == name:
        return True
    if pattern.startswith("*."):
        label, dot, rest = name.partition(".")
        return bool(label and dot) and "*" not in label and rest == pattern[2:]
    try:
        return ipaddress.ip_address(pattern) == ipaddress.ip_address(name)
    except ValueError:  # not two addresses, and not equal as written
        return False


def _load_cert(ctx: ssl.SSLContext, cert: Path | str, key: Path | str | None) -> None:
    try:
        ctx.load_cert_chain(str(cert), None if key is None else str(key))
    except OSError as exc:  # ssl.SSLError is one
        raise ValueError(f"cannot use {cert}{'' if key is None else f' with {key}'} as the "
                         f"TLS certificate and its key ({_why(exc)}): give a PEM "
                         "certificate and its private key") from None


def _load_ca(ctx: ssl.SSLContext, ca: Path | str, signed: str) -> None:
    try:
        ctx.load_verify_locations(cafile=str(ca))
    except OSError as exc:
        raise ValueError(f"cannot use {ca} as the TLS CA certificates ({_why(exc)}): give "
                         f"the PEM certificates of the CAs that sign {signed}") from None


def _why(exc: OSError) -> str:
    """What an SSL or file error says, shortly."""
    text = getattr(exc, "reason", None) or exc.strerror or str(exc) or type(exc).__name__
    return str(text).replace("_", " ").lower() if getattr(exc, "reason", None) else str(text)


def handshake_error(ctx: ssl.SSLContext, host: str, port: int, timeout: float) -> str | None:
    """Why a TLS handshake with ``host:port`` fails (None: it does not), for a one-line
    error where pynetdicom only says that the association was aborted."""
    import socket

    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                ctx.wrap_socket(raw, server_hostname=host) as tls:
            # with TLS 1.3 the server checks our certificate after the handshake ends on
            # our side: its refusal is the first thing it sends
            tls.settimeout(min(timeout, 2.0))
            try:
                if tls.recv(1) == b"":
                    return closed_by("the PACS")
            except TimeoutError:  # waiting for our A-ASSOCIATE-RQ: the handshake is fine
                pass
            return None
    except OSError as exc:
        return failure(exc, closed_by("the PACS"), "the PACS' certificate: ")


def closed_by(server: str) -> str:
    """A server that closed the connection during the handshake, as its client says it."""
    return f"{server} closed the connection during the handshake (does it ask for a " \
        "certificate of ours?)"


def failure(exc: BaseException, closed: str, verify: str = "certificate verify failed: "
            ) -> str:
    """Why a TLS connection failed, from the SSL error in ``exc`` or in the errors it
    wraps (requests' and urllib3's; not their text, which holds the request's URL):
    ``closed`` where the peer only closed or reset the connection (with TLS 1.3 a server
    refuses our certificate after the handshake: we see its alert or, depending on
    timing, only the closing), ``verify`` before a certificate's verification error."""
    seen: set[int] = set()
    todo: list[object] = [exc]
    while todo:
        e = todo.pop(0)
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ssl.SSLCertVerificationError):
            return f"{verify}{e.verify_message}"
        if isinstance(e, ssl.SSLEOFError | ssl.SSLZeroReturnError | ConnectionResetError):
            return closed
        if isinstance(e, ssl.SSLError) and e.reason:
            return _why(e)
        todo.extend([*e.args, getattr(e, "reason", None), e.__cause__, e.__context__])
    return _why(exc) if isinstance(exc, OSError) else "no reason given"
