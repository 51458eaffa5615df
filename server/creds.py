"""Credentials for a secured Flower federation: a CA, the SuperLink's TLS certificate, and
one EC key pair per SuperNode for SuperNode authentication.

Flower's SuperNode authentication needs TLS. The SuperLink presents ``server.pem``
(signed by ``ca.crt``; its names must include the address the boxes dial), and every
SuperNode checks it with ``--root-certificates ca.crt``. Each SuperNode signs its
requests with its private key ``<name>.key`` (OpenSSH format, NIST P-384); only the public
keys registered with ``flwr supernode register`` may join a SuperLink started with
``--enable-supernode-auth``. Private keys are written with mode 0600.

Existing files are kept, so rerunning never invalidates a deployed box's credentials;
``--force`` makes new ones.

Example: ``python -m server.creds --out deploy/creds --host server.lan --nodes box-0 box-1``
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

VALID_DAYS = 365  # a test federation's lifetime; real deployments use their own PKI


def _write(path: Path, data: bytes, private: bool = False) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    if private:
        os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key, issuer: str, issuer_key, ca: bool, hosts: list[str] = ()) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=VALID_DAYS))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if hosts:
        names = []
        for h in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                names.append(x509.DNSName(h))
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_tls(out: Path, hosts: list[str], force: bool = False) -> dict[str, Path]:
    """``ca.crt``/``ca.key`` and the SuperLink's ``server.pem``/``server.key`` for ``hosts``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / k for k in ("ca.crt", "ca.key", "server.pem", "server.key")}
    if not force and all(p.is_file() for p in paths.values()):
        return paths
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = _cert("papm-test-ca", ca_key, "papm-test-ca", ca_key, ca=True)
    key = ec.generate_private_key(ec.SECP384R1())
    cert = _cert(hosts[0], key, "papm-test-ca", ca_key, ca=False, hosts=hosts)
    _write(paths["ca.key"], _pem_key(ca_key), private=True)
    _write(paths["server.key"], _pem_key(key), private=True)
    _write(paths["server.pem"], cert.public_bytes(serialization.Encoding.PEM))
    _write(paths["ca.crt"], ca.public_bytes(serialization.Encoding.PEM))  # last: marks a complete set
    return paths


def make_node_key(out: Path, name: str, force: bool = False) -> tuple[Path, Path]:
    """``<name>.key`` (private, OpenSSH) and ``<name>.pub`` (OpenSSH public key)."""
    out.mkdir(parents=True, exist_ok=True)
    priv, pub = out / f"{name}.key", out / f"{name}.pub"
    if not force and priv.is_file() and pub.is_file():
        return priv, pub
    key = ec.generate_private_key(ec.SECP384R1())
    _write(priv, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                   serialization.NoEncryption()), private=True)
    _write(pub, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                              serialization.PublicFormat.OpenSSH) + b"\n")
    return priv, pub


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m server.creds", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="deploy/creds", help="folder for the credentials")
    ap.add_argument("--host", action="append", default=[],
                    help="a name or IP the boxes use to reach the SuperLink (repeatable; "
                         "127.0.0.1 and localhost are always added)")
    ap.add_argument("--nodes", nargs="+", default=[], help="SuperNode names, one key pair each")
    ap.add_argument("--force", action="store_true", help="replace existing credentials")
    args = ap.parse_args(argv)
    out = Path(args.out)
    hosts = list(dict.fromkeys([*args.host, "localhost", "127.0.0.1"]))
    tls = make_tls(out, hosts, args.force)
    print(f"TLS: {tls['ca.crt']} (give to every box), {tls['server.pem']} + {tls['server.key']} "
          f"(SuperLink only) for {', '.join(hosts)}")
    for n in args.nodes:
        priv, pub = make_node_key(out, n, args.force)
        print(f"{n}: {priv} (copy to that box only), {pub} (register on the SuperLink)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
