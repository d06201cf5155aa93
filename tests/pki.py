"""Test certificates made on the fly (cryptography): a CA, server and client certs, and a rogue CA."""
from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path


def make_pki(out: Path) -> dict[str, Path]:
    """ca, srv, srv_key, cli, cli_key (signed by ca), and rogue_ca, rogue_cli, rogue_cli_key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.timezone.utc)

    def cert(name, issuer=None, issuer_key=None, ca=False, san=None, usage=None):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        b = (x509.CertificateBuilder().subject_name(subject)
             .issuer_name(issuer.subject if issuer else subject)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        if usage:
            b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        return b.sign(issuer_key or key, hashes.SHA256()), key

    ca, ca_key = cert("hashret test CA", ca=True)
    srv, srv_key = cert("localhost", ca, ca_key, usage=ExtendedKeyUsageOID.SERVER_AUTH,
                        san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cli, cli_key = cert("client", ca, ca_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    rogue_ca, rogue_key = cert("rogue CA", ca=True)
    rogue_cli, rogue_cli_key = cert("client", rogue_ca, rogue_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    paths: dict[str, Path] = {}
    for name, c in {"ca": ca, "srv": srv, "cli": cli, "rogue_ca": rogue_ca, "rogue_cli": rogue_cli}.items():
        paths[name] = out / f"{name}.pem"
        paths[name].write_bytes(c.public_bytes(serialization.Encoding.PEM))
    for name, k in {"srv_key": srv_key, "cli_key": cli_key, "rogue_cli_key": rogue_cli_key}.items():
        paths[name] = out / f"{name}.pem"
        paths[name].write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
    return paths
