"""Every use of pyOpenSSL's private API and of OpenSSL's C functions through cffi.

pyOpenSSL >= 26 < 27 and cryptography >= 45 < 51 are pinned for this file (pyproject.toml):
what it reaches into is not their public API. Everything here is a plain function of an
`SSL.Connection` or `SSL.Context`, so that no per-session object is added (an idle device
session costs ~35 KiB, bench/idle_memory.py) and the data path keeps its `__slots__`.

**The data path** (lb.datapath): a server-side `SSL.Connection` over memory BIOs, driven with
`SSL_read`, `SSL_write`, `BIO_read` and `BIO_write` directly. pyOpenSSL's `recv`/`send`
allocate 64 KiB per call, check their callback helpers on every call and end each loop with
a `WantReadError` (bench rr_200 and bulk, bench/README.md); one event loop per process runs
every callback in turn, so one buffer per direction is shared by all connections.

**After a TLS 1.3 handshake** `take_over` frees the OpenSSL connection (about 27 KiB) and
returns a `Session`: lb.tls_records' record layer, keyed with the two application traffic
secrets OpenSSL gave the keylog callback (lb.tls), plus the few facts the log line, the
PROXY v2 header and close-revoked read later (the client's certificate as DER, the verified
chain, ALPN, SNI). It counts the records OpenSSL already sealed with the server's secret (its
NewSessionTickets) and takes the client's bytes OpenSSL has not read. Where it cannot (TLS 1.2,
a cipher suite tls_records does not have, a negotiated max_fragment_length, bytes OpenSSL
holds), the OpenSSL connection stays, and `release_handshake_state` drops what only the
handshake needed. `session_info`, `peer_name_parts`, `verified_chain_subjects`,
`peer_certificates`, `alpn` and `servername` read either kind.

**SSL_CTX_ctrl and OPENSSL_sk_pop** for the TLS settings pyOpenSSL has no API for: the
server session cache size (`tune.ssl.cachesize`) and the session ticket keys
(`tls-ticket-keys`); and `OPENSSL_sk_pop`, to let an established session drop the
intermediates its client sent. `SSL_has_pending` and `SSL_SESSION_get_max_fragment_length`,
which `take_over` checks, are found the same way.

pyOpenSSL and `cryptography` do not bind `SSL_CTX_ctrl`, and the OpenSSL they use is
usually linked statically into cryptography's `_rust.abi3.so` (a different copy, often a
different version, from the system's libssl), so calling the system libssl on their
`SSL_CTX *` would be undefined behaviour. Instead this module finds `SSL_CTX_ctrl` *inside
the object that holds pyOpenSSL's OpenSSL*:

1. the address of a function cffi does bind (`SSL_CTX_set_timeout`, via
   `ffi.addressof`) names the loaded object in /proc/self/maps and its load base;
2. the object's ELF symbol table (`.symtab`, kept in the wheels; `.dynsym` for a system
   libssl) gives `SSL_CTX_ctrl`'s offset;
3. the result is checked before use: the bound function must sit exactly where the symbol
   table says, and `SSL_CTRL_GET_SESS_CACHE_SIZE` on a fresh context must answer OpenSSL's
   default (20480).

When any step fails, `available()` is False and callers fall back (a warning; the cache
keeps OpenSSL's default size, tickets use per-process random keys). `OPENSSL_sk_pop` is
found the same way and checked on a stack of its own (push two, pop, count); without it
`drop_peer_chain` does nothing. Without `SSL_has_pending` or
`SSL_SESSION_get_max_fragment_length`, `take_over` keeps OpenSSL for every session.

Ticket keys follow HAProxy's `tls-ticket-keys` file (configuration.txt, 5.1): base64 lines
of 80 bytes (name 16, AES key 32, HMAC key 32) or 48 bytes (AES-128 variant), at least 3;
the penultimate key encrypts. OpenSSL's built-in ticket code holds a single key
(`SSL_CTRL_SET_TLSEXT_TICKET_KEYS`, 80 bytes: name, HMAC key, AES key), so lb encrypts and
decrypts with the penultimate key only: after a rotation, clients holding a ticket made with
an older key do one full handshake. Every worker that loads the same file issues and accepts
the same tickets, which is what makes resumption work whichever worker a client reaches.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import logging
import struct
import sys
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.bindings._rust import _openssl
from OpenSSL import SSL, crypto

from lb import proxyproto, tls_records

logger = logging.getLogger(__name__)

#: cryptography's cffi module: the `ffi` and the C functions pyOpenSSL's own `lib` copies.
ffi: Any = _openssl.ffi
lib: Any = _openssl.lib

# --------------------------------------------------------------------------------------------
# The data path: one server-side SSL.Connection over memory BIOs

#: Plaintext read from the TLS engine at a time (one TLS record is at most 16 KiB).
TLS_READ_SIZE = 65536
#: Ciphertext taken from the engine's outgoing BIO at a time.
TLS_WRITE_SIZE = 65536 + 4096
#: Bytes handed to the engine at a time, either way: one TLS record's plaintext (RFC 8446
#: 5.1), so that a memory BIO never holds (and never keeps the capacity of) more than about
#: one record. Before: a BIO grew to the largest read or write ever (uvloop reads up to
#: 256 KiB) and kept it for the session's life. It is also the fastest: bulk_1 CPU s/GB was
#: 1.72 with 16 KiB, 2.70 with 64 KiB, 6.35 with 1 MiB (same machine, same hour; noisy).
TLS_CHUNK = 16384

# One event loop per process runs every callback in turn, so one buffer per direction is
# shared by all connections; each read is copied out to bytes before the next.
_READ_BUFFER = ffi.new("char[]", TLS_READ_SIZE)
_WRITE_BUFFER = ffi.new("char[]", TLS_WRITE_SIZE)
_NO_DATA = ffi.new("char **")
_buffer = ffi.buffer
_from_buffer = ffi.from_buffer
_SSL_read = lib.SSL_read
_SSL_write = lib.SSL_write
_SSL_get_error = lib.SSL_get_error
_SSL_ERROR_WANT_READ = lib.SSL_ERROR_WANT_READ
_SSL_do_handshake = lib.SSL_do_handshake
_BIO_read = lib.BIO_read
_BIO_write = lib.BIO_write
#: include/openssl/err.h: how OpenSSL 3 packs an error (ERR_GET_LIB is a macro cffi does not
#: bind): the library above bit 23, unless the system flag marks an errno.
_ERR_LIB_OFFSET = 23
_ERR_LIB_MASK = 0xFF
_ERR_SYSTEM_FLAG = 0x80000000


class TLSError(SSL.Error):
    """pyOpenSSL's SSL.Error for a failed session (the same `args`: OpenSSL's words), with
    the (library, reason) numbers of the first error OpenSSL queued, which lb.tls_codes
    classifies: the words are OpenSSL's, and OpenSSL 3.2 reworded some of them."""

    def __init__(self, error: SSL.Error, reasons: tuple[tuple[int, int], ...]) -> None:
        super().__init__(*error.args)
        self.reasons = reasons


def _raise_error(tls: SSL.Connection, ssl: Any, result: int) -> None:
    """pyOpenSSL's exception for `result` (a callback's own exception first), the
    failures as TLSError; WantRead, WantWrite and ZeroReturn as pyOpenSSL raises them."""
    packed = lib.ERR_peek_error()  # before pyOpenSSL empties the queue for its words
    reasons: tuple[tuple[int, int], ...] = ()
    if packed and not packed & _ERR_SYSTEM_FLAG:
        reasons = (((packed >> _ERR_LIB_OFFSET) & _ERR_LIB_MASK, lib.ERR_GET_REASON(packed)),)
    try:
        tls._raise_ssl_error(ssl, result)
    except (SSL.WantReadError, SSL.WantWriteError, SSL.ZeroReturnError):
        raise
    except SSL.Error as error:
        raise TLSError(error, reasons) from None


def feed(tls: SSL.Connection, data: bytes | memoryview) -> None:
    """Ciphertext from the client into the engine (at most TLS_CHUNK bytes at a time)."""
    _BIO_write(tls._into_ssl, _from_buffer(data), len(data))


def handshake(tls: SSL.Connection) -> bool:
    """Go on with the server handshake on what `feed` gave: True once it is complete,
    False while it waits for the client. Raises TLSError when it failed, or whatever a
    verify, SNI, ALPN or OCSP callback raised (pyOpenSSL keeps it and raises it here). What
    pyOpenSSL's do_handshake does, plus the reason numbers of a failure."""
    ssl = tls._ssl
    result = _SSL_do_handshake(ssl)
    if result == 1:
        return True
    try:
        _raise_error(tls, ssl, result)
    except SSL.WantReadError:
        return False
    return True


def read(tls: SSL.Connection) -> bytes:
    """Plaintext the engine can give now (one record at most); b"" when it needs more
    ciphertext. Raises SSL.ZeroReturnError at the client's close_notify, TLSError when the
    connection failed. SSL_read into one shared buffer: pyOpenSSL's recv allocates
    64 KiB per call and ends every loop with a WantReadError (bench rr_200)."""
    ssl = tls._ssl
    count = _SSL_read(ssl, _READ_BUFFER, TLS_READ_SIZE)
    if count > 0:
        plaintext: bytes = _buffer(_READ_BUFFER, count)[:]
        return plaintext
    if _SSL_get_error(ssl, count) != _SSL_ERROR_WANT_READ:
        _raise_error(tls, ssl, count)
    return b""


def encrypt(tls: SSL.Connection, data: bytes) -> bytes:
    """`data` as TLS records for the client. Raises TLSError when the connection failed.

    SSL_write directly: pyOpenSSL's send checks its callback helpers every call. More than
    TLS_CHUNK is written TLS_CHUNK at a time, drained after each, so the outgoing BIO never
    holds (and keeps the capacity of) a whole read. pyOpenSSL sets
    SSL_MODE_ENABLE_PARTIAL_WRITE, so SSL_write stops after one record: one of at most
    512 bytes when the client negotiated max_fragment_length (RFC 6066); what it did not
    take is written again."""
    ssl = tls._ssl
    size = len(data)
    written = 0
    if size <= TLS_CHUNK:
        written = _SSL_write(ssl, _from_buffer(data), size)
        if written == size:  # the usual case: one record
            return take_output(tls)
        if written <= 0:
            _raise_error(tls, ssl, written)
    chunks: list[bytes] = []
    view = memoryview(data)
    while written < size:  # the output of a partial write above is taken with the next
        piece = view[written : written + TLS_CHUNK]
        count = _SSL_write(ssl, _from_buffer(piece), len(piece))
        if count <= 0:
            _raise_error(tls, ssl, count)
        written += count
        chunks.append(take_output(tls))
    return b"".join(chunks)


def take_output(tls: SSL.Connection) -> bytes:
    """The ciphertext the engine has made since it was last asked (b"": none). BIO_read
    into one shared buffer: no 68 KiB allocation per call and no WantReadError to end the
    loop (bench/README.md, rr_200 and bulk)."""
    from_ssl = tls._from_ssl
    count = _BIO_read(from_ssl, _WRITE_BUFFER, TLS_WRITE_SIZE)
    if count <= 0:
        return b""
    first: bytes = _buffer(_WRITE_BUFFER, count)[:]
    count = _BIO_read(from_ssl, _WRITE_BUFFER, TLS_WRITE_SIZE)
    if count <= 0:
        return first
    chunks = [first]
    while count > 0:
        chunks.append(_buffer(_WRITE_BUFFER, count)[:])
        count = _BIO_read(from_ssl, _WRITE_BUFFER, TLS_WRITE_SIZE)
    return b"".join(chunks)


def release_handshake_state(tls: SSL.Connection) -> None:
    """Drop what only the handshake needed; an idle session keeps the rest for days. Each
    step's saving is per session, measured with bench/idle_memory.py."""
    ssl = tls._ssl
    # No callback (verify, SNI, ALPN, OCSP) runs after the handshake (renegotiation is
    # off), so pyOpenSSL's SSL* -> Connection map entry can go: ~400 B of weakref.
    SSL.Connection._reverse_mapping.pop(ssl, None)
    # The intermediates the client sent (a parsed copy, ~5.8 KiB each): the verified
    # chain keeps the ones verification used, which are what close-revoked checks.
    drop_peer_chain(tls)
    # Fresh memory BIOs: the old ones keep the capacity of the handshake flights
    # (~4 KiB together). Only when the incoming one is drained (it always is here,
    # unless the client pipelined a partial record behind its Finished).
    if lib.BIO_get_mem_data(tls._into_ssl, _NO_DATA) == 0:
        into_ssl, from_ssl = lib.BIO_new(lib.BIO_s_mem()), lib.BIO_new(lib.BIO_s_mem())
        if ffi.NULL in (into_ssl, from_ssl):  # out of memory: keep the old pair
            for bio in (into_ssl, from_ssl):
                if bio != ffi.NULL:
                    lib.BIO_free(bio)
        else:
            lib.SSL_set_bio(ssl, into_ssl, from_ssl)  # frees the old pair
            tls._into_ssl, tls._from_ssl = into_ssl, from_ssl


# --------------------------------------------------------------------------------------------
# After a TLS 1.3 handshake: lb.tls_records instead of OpenSSL

#: TLS1_3_VERSION (include/openssl/prov_ssl.h), what SSL_version answers.
TLS1_3_VERSION = 0x0304

Algorithms = tuple[str | None, str | None]


class Session(tls_records.Records):
    """A TLS 1.3 connection once `take_over` has freed OpenSSL's: its records, and what the
    log line, the PROXY v2 header and close-revoked read later. The certificates are DER
    (a parsed OpenSSL X509 is ~5.4 KiB, its DER ~0.5 KiB); the verified chain's CA
    certificates, ALPN and SNI are shared between sessions (`_shared`)."""

    __slots__ = ("algorithms", "alpn", "leaf", "servername", "verified")

    def __init__(
        self,
        suite: tls_records.CipherSuite,
        read_secret: bytes,
        write_secret: bytes,
        *,
        write_seq: int,
        leaf: bytes | None,
        verified: tuple[bytes, ...],
        alpn: bytes | None,
        servername: bytes | None,
        algorithms: Algorithms,
    ) -> None:
        super().__init__(suite, read_secret, write_secret, write_seq=write_seq)
        self.leaf = leaf  # the client's certificate, DER; None without one
        self.verified = verified  # the verified chain, leaf first (empty: resumed)
        self.alpn = alpn
        self.servername = servername
        self.algorithms = algorithms  # cert-key, cert-sig of the certificate served


#: Values many sessions share (CA certificates of verified chains, ALPN, SNI), one copy each;
#: bounded, since a client chooses its SNI.
_SHARED_LIMIT = 256
_shared_values: dict[bytes, bytes] = {}


def _shared(value: bytes) -> bytes:
    known = _shared_values.get(value)
    if known is not None:
        return known
    if len(_shared_values) < _SHARED_LIMIT:
        _shared_values[value] = value
    return value


#: One memory BIO for DER encodings, drained after each (one event loop per process).
_DER_BIO = lib.BIO_new(lib.BIO_s_mem())
#: DER of the CA certificates verified chains end in, by `X509 *`: each entry holds a
#: reference, so its address cannot be reused for another certificate while it is here.
#: Bounded; a CA past the bound is encoded for each session.
_chain_members: dict[int, tuple[object, bytes]] = {}


def _der(certificate: Any) -> bytes:
    """An `X509 *` in DER (i2d_X509_bio; ~1 us, pyOpenSSL's dump_certificate ~3.4)."""
    if lib.i2d_X509_bio(_DER_BIO, certificate) != 1:
        raise ValueError("certificate cannot be encoded")
    return _drain(_DER_BIO)


def _chain_member(certificate: Any) -> bytes:
    address = int(ffi.cast("uintptr_t", certificate))
    known = _chain_members.get(address)
    if known is not None:
        return known[1]
    der = _der(certificate)
    if len(_chain_members) < _SHARED_LIMIT:
        lib.X509_up_ref(certificate)
        _chain_members[address] = (ffi.gc(certificate, lib.X509_free), _shared(der))
    return der


def take_over(
    tls: SSL.Connection,
    tickets: bytes,
    client_secret: bytes | None,
    server_secret: bytes | None,
    algorithms: Algorithms,
) -> tuple[Session, bytes] | None:
    """Replace a server connection whose TLS 1.3 handshake has just completed with a
    Session, or None when OpenSSL must stay (see the module docstring). `tickets` is what
    the completing SSL_do_handshake wrote (records under the server's application secret);
    the secrets are the keylog callback's CLIENT_TRAFFIC_SECRET_0 and SERVER_TRAFFIC_SECRET_0.
    Returns the Session and the client's bytes OpenSSL had not read yet (records for it);
    the caller then drops `tls`, which frees OpenSSL's connection."""
    if client_secret is None or server_secret is None:
        return None
    ssl = tls._ssl
    if lib.SSL_version(ssl) != TLS1_3_VERSION:
        return None
    suite = tls_records.SUITES.get(tls.get_cipher_name() or "")
    if suite is None or len(client_secret) != suite.hash_length:
        return None
    has_pending, max_fragment_length = _resolve_session_checks()
    if has_pending is None or max_fragment_length is None:
        return None
    session = lib.SSL_get_session(ssl)
    if session == ffi.NULL or max_fragment_length(session) != 0:
        return None  # RFC 6066 max_fragment_length: records would have to be smaller
    if has_pending(ssl):
        return None  # a record OpenSSL has read (or begun): only it can give it back
    write_seq = tls_records.count_records(tickets)
    if write_seq is None:
        return None
    peer = lib.SSL_get_peer_certificate(ssl)  # a reference of our own
    leaf: bytes | None = None
    verified: tuple[bytes, ...] = ()
    try:
        if peer != ffi.NULL:
            leaf = _der(peer)
        chain = lib.SSL_get0_verified_chain(ssl)
        if chain != ffi.NULL:
            verified = tuple(
                leaf if member == peer and leaf is not None else _chain_member(member)
                for member in (
                    lib.sk_X509_value(chain, index) for index in range(lib.sk_X509_num(chain))
                )
            )
    finally:
        if peer != ffi.NULL:
            lib.X509_free(peer)
    alpn = tls.get_alpn_proto_negotiated()
    servername = tls.get_servername()
    unread = _drain(tls._into_ssl)  # the client's bytes OpenSSL has not read
    return (
        Session(
            suite,
            client_secret,
            server_secret,
            write_seq=write_seq,
            leaf=leaf,
            verified=verified,
            alpn=_shared(alpn) if alpn else None,
            servername=_shared(servername) if servername else None,
            algorithms=algorithms,
        ),
        unread,
    )


def _drain(bio: Any) -> bytes:
    """Everything a memory BIO holds."""
    size = lib.BIO_get_mem_data(bio, _NO_DATA)
    chunks = []
    while size > 0:
        count = _BIO_read(bio, _READ_BUFFER, min(size, TLS_READ_SIZE))
        if count <= 0:
            break
        chunks.append(_buffer(_READ_BUFFER, count)[:])
        size -= count
    return b"".join(chunks)


# --------------------------------------------------------------------------------------------
# What a session says about itself (PROXY v2 TLVs, log lines)


_SSL = int(proxyproto.ClientFlags.SSL)
_CERT_CONN = int(proxyproto.ClientFlags.CERT_CONN)
_CERT_SESS = int(proxyproto.ClientFlags.CERT_SESS)

#: What a TLS session is while it lasts: OpenSSL's connection, or a Session after take_over.
Established = SSL.Connection | Session


def session_info(tls: SSL.Connection) -> proxyproto.SSLInfo:
    """The PP2_TYPE_SSL facts of an established session (proxy-protocol.txt 2.2.5)."""
    # Or'ed as ints and made a ClientFlags once (each `|` on the IntFlag is an enum call).
    flags = _SSL
    verify = 0
    cn: str | None = None
    certificate = tls.get_peer_certificate()
    ssl = tls._ssl
    if certificate is not None:
        flags |= _CERT_SESS
        verify = int(lib.SSL_get_verify_result(ssl))
        if not lib.SSL_session_reused(ssl):
            flags |= _CERT_CONN
        # X509_NAME lookup in OpenSSL: a to_cryptography() parse cost ~5% of lb CPU per
        # resumed handshake (py-spy, bench resume_*), and pyOpenSSL's get_subject() ~8 us
        # (its deprecation warning).
        cn = _common_name(certificate._x509)
    version = tls.get_protocol_version_name()
    cipher = tls.get_cipher_name()
    return proxyproto.SSLInfo(
        client=proxyproto.ClientFlags(flags),
        verify=verify,
        # One copy of each name for every session (~130 B per session otherwise).
        version=sys.intern(version),
        cn=cn,
        cipher=sys.intern(cipher) if cipher is not None else None,
        sig_alg=None,
        key_alg=None,
    )


#: include/openssl/obj_mac.h
NID_COMMON_NAME = 13


def _common_name(certificate: Any) -> str | None:
    """The first commonName of an `X509 *`'s subject, as pyOpenSSL's X509Name reads it."""
    name = lib.X509_get_subject_name(certificate)
    index = lib.X509_NAME_get_index_by_NID(name, NID_COMMON_NAME, -1)
    if index < 0:
        return None
    data = lib.X509_NAME_ENTRY_get_data(lib.X509_NAME_get_entry(name, index))
    result = ffi.new("unsigned char **")
    length = lib.ASN1_STRING_to_UTF8(result, data)
    if length < 0:
        return None
    try:
        return str(ffi.buffer(result[0], length)[:].decode("utf-8"))
    finally:
        lib.OPENSSL_free(result[0])


NameParts = tuple[tuple[str, str], ...]


def peer_name_parts(tls: Established) -> tuple[NameParts, NameParts]:
    """The client certificate's subject and issuer as (attribute, value) pairs, in order
    (for `%[ssl_c_s_dn]` and friends); empty without a client certificate."""
    if isinstance(tls, Session):
        if tls.leaf is None:
            return (), ()
        certificate = crypto.load_certificate(crypto.FILETYPE_ASN1, tls.leaf)
    else:
        found = tls.get_peer_certificate()
        if found is None:
            return (), ()
        certificate = found
    pointer = certificate._x509
    return (
        _name_parts(lib.X509_get_subject_name(pointer)),
        _name_parts(lib.X509_get_issuer_name(pointer)),
    )


def _name_parts(name: Any) -> NameParts:
    """An `X509_NAME *` as (short name, value) pairs: what pyOpenSSL's
    X509Name.get_components reads, without its deprecated X509.get_subject."""
    parts = []
    for index in range(lib.X509_NAME_entry_count(name)):
        entry = lib.X509_NAME_get_entry(name, index)
        key = ffi.string(lib.OBJ_nid2sn(lib.OBJ_obj2nid(lib.X509_NAME_ENTRY_get_object(entry))))
        data = lib.X509_NAME_ENTRY_get_data(entry)
        value = ffi.buffer(lib.ASN1_STRING_get0_data(data), lib.ASN1_STRING_length(data))[:]
        parts.append((key.decode("ascii", "replace"), value.decode("utf-8", "replace")))
    return tuple(parts)


def verified_chain_subjects(tls: Established) -> tuple[bytes, ...]:
    """DER subjects of the verified client chain, leaf first, up to the root."""
    if isinstance(tls, Session):
        return tuple(x509.load_der_x509_certificate(c).subject.public_bytes() for c in tls.verified)
    chain = tls.get_verified_chain()
    if not chain:
        return ()
    return tuple(c.to_cryptography().subject.public_bytes() for c in chain)


def peer_certificates(tls: Established) -> list[x509.Certificate]:
    """Every certificate a session holds of its client (for close-revoked): its own, then
    the verified chain (none after a resumption), then any others it sent."""
    if isinstance(tls, Session):
        certificates = [tls.leaf] if tls.leaf is not None else []
        return [x509.load_der_x509_certificate(c) for c in (*certificates, *tls.verified)]
    leaf = tls.get_peer_certificate(as_cryptography=True)
    verified = tls.get_verified_chain(as_cryptography=True) or []
    presented = tls.get_peer_cert_chain(as_cryptography=True) or []
    return [*([leaf] if leaf else []), *verified, *presented]


def alpn(tls: Established) -> bytes | None:
    """The protocol ALPN chose, None when none was."""
    if isinstance(tls, Session):
        return tls.alpn
    return tls.get_alpn_proto_negotiated() or None


def servername(tls: Established) -> bytes | None:
    """The client's SNI host name."""
    if isinstance(tls, Session):
        return tls.servername
    return tls.get_servername()


def verify_error_string(code: int) -> str:
    """OpenSSL's words for an X509_V_ERR id (X509_verify_cert_error_string)."""
    text = lib.X509_verify_cert_error_string(code)
    return str(ffi.string(text).decode("ascii", "replace"))


# --------------------------------------------------------------------------------------------
# The handshake's callbacks, without pyOpenSSL's wrappers

#: The C callbacks of each context: they must live as long as the context (and its SSL_CTX,
#: which every connection made from it holds).
_CALLBACKS: weakref.WeakKeyDictionary[SSL.Context, list[Any]] = weakref.WeakKeyDictionary()

#: What a verify callback is told of a certificate that did not verify: the connection, the
#: certificate, the X509_V_ERR code and its depth in the chain; it answers whether to go on.
VerifyFailed = Callable[[SSL.Connection, crypto.X509, int, int], bool]


def set_verify(context: SSL.Context, mode: int, failed: VerifyFailed) -> None:
    """SSL_CTX_set_verify with a callback that answers a certificate OpenSSL verified itself
    and calls `failed` for one it did not (OpenSSL calls it for every certificate of the
    chain). pyOpenSSL's set_verify wraps each call: a Python X509 for the certificate and a
    lookup of the connection, ~450 Python opcodes a handshake for three certificates that
    verified (bench/lb_opcodes.py). An exception in `failed` refuses the certificate, logged.
    """

    def verify(ok: int, store: Any) -> int:
        if ok:
            return 1
        try:
            pointer = lib.X509_STORE_CTX_get_current_cert(store)
            lib.X509_up_ref(pointer)
            certificate = crypto.X509._from_raw_x509_ptr(pointer)
            ssl = lib.X509_STORE_CTX_get_ex_data(store, lib.SSL_get_ex_data_X509_STORE_CTX_idx())
            connection = SSL.Connection._reverse_mapping[ssl]
            code = lib.X509_STORE_CTX_get_error(store)
            depth = lib.X509_STORE_CTX_get_error_depth(store)
            if failed(connection, certificate, code, depth):
                lib.X509_STORE_CTX_set_error(store, lib.X509_V_OK)
                return 1
        except Exception:
            logger.exception("certificate verify callback failed: the certificate is refused")
        return 0

    callback = ffi.callback("int (*)(int, X509_STORE_CTX *)", verify)
    lib.SSL_CTX_set_verify(context._context, mode, callback)
    _CALLBACKS.setdefault(context, []).append(callback)


def set_keylog(
    context: SSL.Context, labels: tuple[bytes, ...], keep: Callable[[SSL.Connection, bytes], None]
) -> None:
    """SSL_CTX_set_keylog_callback that gives `keep` the lines whose label is one of
    `labels` ("LABEL <client random> <secret>", hex) with their connection. pyOpenSSL's
    looks up the connection for every line (five a TLS 1.3 handshake) before its callback
    can look at the label."""
    prefixes = tuple(label + b" " for label in labels)

    def keylog(ssl: Any, line: Any) -> None:
        text = ffi.string(line)
        if not text.startswith(prefixes):
            return
        try:
            keep(SSL.Connection._reverse_mapping[ssl], text)
        except Exception:
            logger.exception("keylog callback failed")

    callback = ffi.callback("void (*)(const SSL *, const char *)", keylog)
    lib.SSL_CTX_set_keylog_callback(context._context, callback)
    _CALLBACKS.setdefault(context, []).append(callback)


# --------------------------------------------------------------------------------------------
# SSL_CTX_ctrl and OPENSSL_sk_pop, found by symbol

#: include/openssl/ssl.h
SSL_CTRL_SET_SESS_CACHE_SIZE = 42
SSL_CTRL_GET_SESS_CACHE_SIZE = 43
SSL_CTRL_GET_TLSEXT_TICKET_KEYS = 58
SSL_CTRL_SET_TLSEXT_TICKET_KEYS = 59
#: SSL_SESSION_CACHE_MAX_SIZE_DEFAULT, what a fresh context answers.
OPENSSL_DEFAULT_CACHE_SIZE = 1024 * 20
#: OpenSSL's ticket key blob: key name 16, HMAC secret 32, AES-256 key 32.
OPENSSL_TICKET_KEY_SIZE = 80
#: HAProxy's TLS_TICKETS_NO: the file must hold at least this many keys.
HAPROXY_TICKET_KEYS = 3

ELF_SHT_SYMTAB = 2
ELF_SHT_DYNSYM = 11

Ctrl = Callable[[object, int, int, object], int]
SkPop = Callable[[object], object]


class TicketKeyError(ValueError):
    """A tls-ticket-keys file that cannot be used; the message names the file and line."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def _elf_symbols(path: str, wanted: set[str]) -> dict[str, int]:
    """Values (offsets from the load base) of `wanted` symbols in an ELF64 little-endian
    shared object, from .symtab and .dynsym."""
    data = Path(path).read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return {}
    section_offset = struct.unpack_from("<Q", data, 0x28)[0]
    entry_size, count = struct.unpack_from("<HH", data, 0x3A)
    sections = [
        struct.unpack_from("<IIQQQQIIQQ", data, section_offset + i * entry_size)
        for i in range(count)
    ]
    found: dict[str, int] = {}
    encoded = {name.encode(): name for name in wanted}
    for _name, kind, _flags, _address, offset, size, link, _info, _align, _entsize in sections:
        if kind not in (ELF_SHT_SYMTAB, ELF_SHT_DYNSYM):
            continue
        strings_offset = sections[link][4]
        for name_index, _info2, _other, shndx, value, _size in struct.iter_unpack(
            "<IBBHQQ", data[offset : offset + size]
        ):
            if shndx == 0 or value == 0:
                continue  # undefined (imported) symbol
            start = strings_offset + name_index
            end = data.index(b"\x00", start)
            name = encoded.get(data[start:end])
            if name is not None:
                found.setdefault(name, value)
        if len(found) == len(wanted):
            break
    return found


def _mapping_of(address: int) -> tuple[str, int] | None:
    """The file mapped at `address` in this process and that file's load base."""
    lines = Path("/proc/self/maps").read_text().splitlines()
    path = None
    for line in lines:
        fields = line.split()
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if start <= address < end and len(fields) >= 6:
            path = fields[5]
            break
    if path is None:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[5] == path and int(fields[2], 16) == 0:
            return path, int(fields[0].split("-")[0], 16)
    return None


#: The unbound functions looked up in the object that holds pyOpenSSL's OpenSSL.
WANTED = frozenset(
    {
        "SSL_CTX_ctrl",
        "OPENSSL_sk_pop",
        "SSL_has_pending",
        "SSL_SESSION_get_max_fragment_length",
        "SSL_SESSION_new",
    }
)


@functools.cache
def _addresses() -> dict[str, int]:
    """Absolute addresses of WANTED in this process, found through a function cffi binds
    (steps 1 and 2 above); empty when the anchor does not sit where the symbols say."""
    try:
        bound = int(ffi.cast("uintptr_t", ffi.addressof(lib, "SSL_CTX_set_timeout")))
        mapping = _mapping_of(bound)
        if mapping is None:
            return {}
        path, base = mapping
        anchors = {"SSL_CTX_set_timeout", "_cffi_d_SSL_CTX_set_timeout"}
        symbols = _elf_symbols(path, set(WANTED) | anchors)
        # cffi binds either the function itself or its own direct-call wrapper.
        if bound - base not in (
            symbols.get("SSL_CTX_set_timeout"),
            symbols.get("_cffi_d_SSL_CTX_set_timeout"),
        ):
            return {}
        return {name: base + symbols[name] for name in WANTED if name in symbols}
    except Exception as error:  # any surprise means "not available", never a crash
        logger.debug("OpenSSL symbols not found: %s", error)
        return {}


@functools.cache
def _resolve() -> Ctrl | None:
    try:
        address = _addresses().get("SSL_CTX_ctrl")
        if address is None:
            return None
        function = ffi.cast("long(*)(SSL_CTX *, int, long, void *)", address)
        probe = SSL.Context(SSL.TLS_SERVER_METHOD)
        answer = function(probe._context, SSL_CTRL_GET_SESS_CACHE_SIZE, 0, ffi.NULL)
        if answer != OPENSSL_DEFAULT_CACHE_SIZE:
            return None

        def ctrl(context: object, command: int, larg: int, parg: object) -> int:
            return int(function(context, command, larg, ffi.NULL if parg is None else parg))

        return ctrl
    except Exception as error:  # any surprise means "not available", never a crash
        logger.debug("SSL_CTX_ctrl not found: %s", error)
        return None


@functools.cache
def _resolve_sk_pop() -> SkPop | None:
    """OPENSSL_sk_pop, checked on a stack of its own: push two pointers, pop one."""
    try:
        address = _addresses().get("OPENSSL_sk_pop")
        if address is None:
            return None
        function = ffi.cast("X509 *(*)(Cryptography_STACK_OF_X509 *)", address)
        stack = lib.sk_X509_new_null()
        if stack == ffi.NULL:
            return None
        try:
            first, second = ffi.cast("X509 *", 0x1000), ffi.cast("X509 *", 0x2000)
            lib.sk_X509_push(stack, first)
            lib.sk_X509_push(stack, second)
            popped = function(stack)  # the pointers are never dereferenced
            if popped != second or lib.sk_X509_num(stack) != 1:
                return None
        finally:
            lib.sk_X509_free(stack)  # frees the stack only, not what it points to
        return function  # type: ignore[no-any-return]
    except Exception as error:  # any surprise means "not available", never a crash
        logger.debug("OPENSSL_sk_pop not found: %s", error)
        return None


HasPending = Callable[[object], int]
MaxFragmentLength = Callable[[object], int]


@functools.cache
def _resolve_session_checks() -> tuple[HasPending | None, MaxFragmentLength | None]:
    """SSL_has_pending and SSL_SESSION_get_max_fragment_length, for take_over; each checked
    on a fresh connection (nothing pending, no max_fragment_length)."""
    try:
        addresses = _addresses()
        pending_address = addresses.get("SSL_has_pending")
        fragment_address = addresses.get("SSL_SESSION_get_max_fragment_length")
        new_address = addresses.get("SSL_SESSION_new")
        if pending_address is None or fragment_address is None or new_address is None:
            return None, None
        has_pending = ffi.cast("int(*)(const SSL *)", pending_address)
        max_fragment_length = ffi.cast("uint8_t(*)(const SSL_SESSION *)", fragment_address)
        probe = SSL.Connection(SSL.Context(SSL.TLS_SERVER_METHOD), None)
        if has_pending(probe._ssl) != 0:
            return None, None
        session = ffi.cast("SSL_SESSION *(*)(void)", new_address)()
        if session == ffi.NULL:
            return None, None
        try:
            if max_fragment_length(session) != 0:
                return None, None
        finally:
            lib.SSL_SESSION_free(session)
        return has_pending, max_fragment_length
    except Exception as error:  # any surprise means "keep OpenSSL", never a crash
        logger.debug("SSL_has_pending or SSL_SESSION_get_max_fragment_length not found: %s", error)
        return None, None


def drop_peer_chain(tls: SSL.Connection) -> int:
    """Free the certificates a client sent besides its own (SSL_get_peer_cert_chain of a
    server `SSL *`, which OpenSSL keeps in the session for the connection's life); the
    leaf (SSL_get_peer_certificate) and the verified chain (SSL_get0_verified_chain, which
    holds its own references) stay. How many were dropped; 0 when sk_pop is unavailable."""
    pop = _resolve_sk_pop()
    if pop is None:
        return 0
    stack = lib.SSL_get_peer_cert_chain(tls._ssl)
    if stack == ffi.NULL:
        return 0
    dropped = 0
    while lib.sk_X509_num(stack) > 0:
        lib.X509_free(pop(stack))
        dropped += 1
    return dropped


def available() -> bool:
    """True when SSL_CTX_ctrl was found in pyOpenSSL's OpenSSL and answered correctly."""
    return _resolve() is not None


def set_session_cache_size(context: SSL.Context, size: int) -> bool:
    """SSL_CTX_sess_set_cache_size; False when SSL_CTX_ctrl is unavailable."""
    ctrl = _resolve()
    if ctrl is None:
        return False
    ctrl(context._context, SSL_CTRL_SET_SESS_CACHE_SIZE, size, None)
    return True


def session_cache_size(context: SSL.Context) -> int | None:
    ctrl = _resolve()
    if ctrl is None:
        return None
    return ctrl(context._context, SSL_CTRL_GET_SESS_CACHE_SIZE, 0, None)


def set_ticket_key(context: SSL.Context, key: bytes) -> bool:
    """Install one 80-byte OpenSSL ticket key (name 16, HMAC 32, AES 32)."""
    if len(key) != OPENSSL_TICKET_KEY_SIZE:
        raise ValueError(f"a ticket key is {OPENSSL_TICKET_KEY_SIZE} bytes, not {len(key)}")
    ctrl = _resolve()
    if ctrl is None:
        return False
    buffer = ffi.new("unsigned char[]", key)
    result = ctrl(
        context._context,
        SSL_CTRL_SET_TLSEXT_TICKET_KEYS,
        OPENSSL_TICKET_KEY_SIZE,
        buffer,
    )
    return result == 1


def ticket_key(context: SSL.Context) -> bytes | None:
    """The context's current 80-byte ticket key (for tests and diagnostics)."""
    ctrl = _resolve()
    if ctrl is None:
        return None
    buffer = ffi.new("unsigned char[]", OPENSSL_TICKET_KEY_SIZE)
    ctrl(
        context._context,
        SSL_CTRL_GET_TLSEXT_TICKET_KEYS,
        OPENSSL_TICKET_KEY_SIZE,
        buffer,
    )
    return bytes(ffi.buffer(buffer))


def load_ticket_keys(path: Path | str) -> bytes:
    """The OpenSSL key for a HAProxy tls-ticket-keys file: its penultimate key (the one
    HAProxy encrypts with), reordered from HAProxy's (name, AES, HMAC) to OpenSSL's
    (name, HMAC, AES). A 48-byte (AES-128) key is stretched to 80 bytes with SHA-512, so
    every process that reads the file derives the same key."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        raise TicketKeyError(path, str(error.strerror or error)) from None
    keys: list[bytes] = []
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            key = base64.b64decode(text, validate=True)
        except ValueError:
            raise TicketKeyError(path, f"line {number}: not base64") from None
        if len(key) not in (48, 80):
            raise TicketKeyError(path, f"line {number}: a key is 48 or 80 bytes, not {len(key)}")
        if keys and len(key) != len(keys[0]):
            raise TicketKeyError(path, f"line {number}: 48- and 80-byte keys cannot be mixed")
        keys.append(key)
    if len(keys) < HAPROXY_TICKET_KEYS:
        raise TicketKeyError(
            path,
            f"{len(keys)} keys; at least {HAPROXY_TICKET_KEYS} are needed "
            "(the penultimate one encrypts)",
        )
    key = keys[-2]
    if len(key) == 48:
        key = key[:16] + hashlib.sha512(b"lb tls-ticket-keys" + key).digest()[:64]
    name, aes, hmac = key[:16], key[16:48], key[48:80]
    return name + hmac + aes
