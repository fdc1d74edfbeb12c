"""CKKS keys and ciphertext operations over TenSEAL's SEAL bindings (``tenseal.sealapi``).

A key holder calls :meth:`CKKSKeys.generate`; the secret context goes to clients only, and
the server receives :meth:`CKKSKeys.public`, which holds the parameters and the key id but
no key at all (the server only adds ciphertexts, which needs no key).

Clients encrypt with SEAL's *seeded symmetric* encryption (Lyubashevsky, Peikert, Regev,
EUROCRYPT 2010, RLWE with a secret-key encryptor): ``c = (-a s + e + m, a)`` where ``a`` is
expanded from a 64-byte public seed, so a client uploads only ``c_0`` and the seed, half a
ciphertext.  Sums are full ciphertexts (the seed does not survive addition).  Serialized
ciphertexts are SEAL's own format, zstd-compressed by SEAL.

SEAL's Python bindings serialize only to file paths, so bytes go through an anonymous
in-memory file (``memfd_create``): nothing, secret keys included, ever touches a disk.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import tenseal.sealapi as seal

from securefl.config.ckks import CKKSParameters
from securefl.engine.messages import Message, decode, encode, message
from securefl.errors import MessageError, ProtocolAbort
from securefl.he.packing import pack, unpack

__all__ = ["CKKSKeys", "Ciphertext"]

Ciphertext = Any  # a loaded ``tenseal.sealapi.Ciphertext``
_KEY_ID_BYTES = 16
_MAX_CONTEXT_BYTES = 1 << 24


@message
class HEContextFile(Message):
    """Serialized :class:`CKKSKeys`: parameters, key id and (private only) SEAL's secret key."""

    poly_modulus_degree: int
    coeff_modulus_bits: tuple[int, ...]
    scale_bits: int
    key_id: bytes
    secret_key: bytes | None


@contextmanager
def _scratch() -> Iterator[tuple[int, str]]:
    """An anonymous in-memory file as ``(fd, path)`` for SEAL's path-only save/load."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("securefl-he", os.MFD_CLOEXEC)
        try:
            yield fd, f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="securefl-he-") as folder:  # private, mode 0700
        path = str(Path(folder) / "blob")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            yield fd, path
        finally:
            os.close(fd)


def _save(obj: Any) -> bytes:
    with _scratch() as (fd, path):
        obj.save(path)
        return os.pread(fd, os.fstat(fd).st_size, 0)


def _load(obj: Any, context: Any, data: bytes) -> None:
    with _scratch() as (fd, path):
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        obj.load(context, path)


class CKKSKeys:
    """CKKS parameters, key id and, when private, the secret key.

    ``is_private()`` tells which; :meth:`public` drops the secret key.  Encrypting and
    decrypting need the secret key (``ValueError`` otherwise); loading and adding
    ciphertexts do not.
    """

    def __init__(self, parameters: CKKSParameters, *, key_id: bytes,
                 secret_key: bytes | None) -> None:
        if not isinstance(key_id, bytes) or len(key_id) != _KEY_ID_BYTES:
            raise ValueError(f"key_id must be {_KEY_ID_BYTES} bytes")
        self.parameters = parameters
        self.key_id = key_id
        self._context = _seal_context(parameters)
        self._parms_id = self._context.first_parms_id()
        self._evaluator = seal.Evaluator(self._context)
        self._secret: Any = None
        self._secret_bytes = secret_key
        if secret_key is not None:
            self._secret = seal.SecretKey()
            try:
                _load(self._secret, self._context, secret_key)
            except Exception as exc:  # SEAL raises several types for a bad key file
                raise ValueError(f"secret key does not match these parameters: {exc}") from None
            self._encoder = seal.CKKSEncoder(self._context)
            self._encryptor = seal.Encryptor(self._context, self._secret)
            self._decryptor = seal.Decryptor(self._context, self._secret)

    # ------------------------------------------------------------------ key material
    @classmethod
    def generate(cls, *, poly_modulus_degree: int = 8192,
                 coeff_modulus_bits: Sequence[int] = (55, 40),
                 scale_bits: int = 36) -> CKKSKeys:
        """Fresh keys (SEAL's key generator, seeded from the OS) and a random 16-byte key id."""
        parameters = CKKSParameters(poly_modulus_degree, tuple(coeff_modulus_bits), scale_bits)
        generator = seal.KeyGenerator(_seal_context(parameters))
        return cls(parameters, key_id=secrets.token_bytes(_KEY_ID_BYTES),
                   secret_key=_save(generator.secret_key()))

    def is_private(self) -> bool:
        return self._secret is not None

    def public(self) -> CKKSKeys:
        """The same parameters and key id without any key: what the server may hold."""
        return CKKSKeys(self.parameters, key_id=self.key_id, secret_key=None)

    def to_bytes(self) -> bytes:
        """Serialize (the secret key is included exactly when :meth:`is_private`)."""
        p = self.parameters
        return encode(HEContextFile(p.poly_modulus_degree, p.coeff_modulus_bits, p.scale_bits,
                                    self.key_id, self._secret_bytes))

    @classmethod
    def from_bytes(cls, data: bytes) -> CKKSKeys:
        """Inverse of :meth:`to_bytes`; ``ValueError`` on anything malformed or insecure."""
        try:
            file = decode(data, max_bytes=_MAX_CONTEXT_BYTES, expect=HEContextFile)
        except MessageError as exc:
            raise ValueError(f"not a serialized CKKS context: {exc}") from None
        parameters = CKKSParameters(file.poly_modulus_degree, file.coeff_modulus_bits,
                                    file.scale_bits)
        return cls(parameters, key_id=file.key_id, secret_key=file.secret_key)

    def _require_secret(self, operation: str) -> None:
        if self._secret is None:
            raise ValueError(f"cannot {operation}: this is a public CKKS context without a "
                             "secret key (only clients hold the secret context)")

    # ------------------------------------------------------------------ ciphertexts
    def ciphertext_count(self, length: int) -> int:
        """Ciphertexts needed for ``length`` reals: ``ceil(length / N)``."""
        return -(-length // self.parameters.reals_per_ciphertext)

    def encrypt(self, values: np.ndarray) -> list[bytes]:
        """Seeded symmetric encryptions of ``values`` (reals), ``N`` per ciphertext."""
        self._require_secret("encrypt")
        plain = seal.Plaintext()
        out = []
        with _scratch() as (fd, path):
            for chunk in pack(values, self.parameters.reals_per_ciphertext):
                self._encoder.encode(chunk.tolist(), self.parameters.scale, plain)
                self._encryptor.encrypt_symmetric(plain).save(path)
                out.append(os.pread(fd, os.fstat(fd).st_size, 0))
        return out

    def load(self, data: bytes) -> Ciphertext:
        """Parse and validate one serialized ciphertext; :class:`ProtocolAbort` if unusable.

        SEAL checks the header, that the parameters match this context and that every
        coefficient is reduced; we also require a fresh-shaped ciphertext (two polynomials,
        NTT form, this context's first data level and exact scale).
        """
        if not isinstance(data, bytes):
            raise ProtocolAbort.because("ciphertext is not bytes")
        ciphertext = seal.Ciphertext()
        try:
            _load(ciphertext, self._context, data)
        except Exception as exc:  # any SEAL failure on untrusted bytes is the same refusal
            raise ProtocolAbort.because(f"ciphertext does not load: {exc}") from None
        if (ciphertext.size() != 2 or not ciphertext.is_ntt_form()
                or list(ciphertext.parms_id()) != list(self._parms_id)
                or ciphertext.scale != self.parameters.scale):
            raise ProtocolAbort.because("ciphertext has the wrong shape, level or scale")
        return ciphertext

    def add_into(self, total: Ciphertext | None, ciphertext: Ciphertext) -> Ciphertext:
        """``total + ciphertext`` in place (SEAL ``add_inplace``); ``total=None`` starts a sum."""
        if total is None:
            return ciphertext
        self._evaluator.add_inplace(total, ciphertext)
        return total

    def dump(self, ciphertext: Ciphertext) -> bytes:
        return _save(ciphertext)

    def decrypt(self, ciphertexts: Sequence[bytes], length: int) -> np.ndarray:
        """Decrypt and unpack the first ``length`` reals (float64).

        Raises :class:`ProtocolAbort` when a value exceeds :attr:`CKKSParameters.capacity`:
        a sum that wrapped modulo ``Q`` decodes to values of order ``Q / Δ``.
        """
        self._require_secret("decrypt")
        if len(ciphertexts) != self.ciphertext_count(length):
            raise ProtocolAbort.because(f"{len(ciphertexts)} ciphertexts cannot hold {length} "
                                        "values")
        plain = seal.Plaintext()
        chunks = []
        for data in ciphertexts:
            self._decryptor.decrypt(self.load(data), plain)
            chunks.append(np.asarray(self._encoder.decode_complex(plain), dtype=np.complex128))
        values = unpack(chunks, length)
        if not np.isfinite(values).all() or (
                values.size and np.max(np.abs(values)) > self.parameters.capacity):
            raise ProtocolAbort.because("decrypted sum exceeds the CKKS capacity "
                                        f"{self.parameters.capacity:.3g} (wrapped modulo Q)")
        return values


def _seal_context(parameters: CKKSParameters) -> Any:
    parms = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
    parms.set_poly_modulus_degree(parameters.poly_modulus_degree)
    parms.set_coeff_modulus(seal.CoeffModulus.Create(parameters.poly_modulus_degree,
                                                     list(parameters.coeff_modulus_bits)))
    context = seal.SEALContext(parms, True, seal.SEC_LEVEL_TYPE.TC128)
    if not context.parameters_set():  # SEAL's own 128-bit check agrees with ours
        raise ValueError(f"SEAL rejects these parameters: {context.parameters_error_message()}")
    return context
