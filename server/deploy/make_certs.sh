#!/usr/bin/env bash
# Test certificates for a shopcast deployment: a private CA, the SuperLink's server certificate
# signed by it, and (optionally) one ECDSA key pair per SuperNode for SuperNode authentication.
#
#   server/deploy/make_certs.sh OUT_DIR [N_SUPERNODES]
#
# Writes into OUT_DIR (TLS keys are ECDSA P-256: instant to make, accepted by Flower's TLS stack):
#   ca.key, ca.crt           the CA (ca.crt goes to every SuperNode and to `flwr`'s config.toml)
#   server.key, server.pem   the SuperLink's key and certificate (signed by the CA)
#   sn0, sn0.pub, sn1, ...   with N_SUPERNODES > 0: `ssh-keygen -t ecdsa -b 384` key pairs; the
#                            private key stays on the merchant's machine, the .pub is registered
#                            with `flwr supernode register snI.pub CONNECTION`
#
# The server certificate's subjectAltName always holds IP:127.0.0.1 and DNS:localhost (TLS clients
# check the SAN, not the CN: without it a SuperNode fails with "IP address mismatch"). A SuperLink that
# merchants reach under another name needs that name too; add it with SERVER_SAN, e.g.
#   SERVER_SAN="DNS:superlink.example.com,IP:203.0.113.7" server/deploy/make_certs.sh certs 2
#
# These are TEST certificates (self-made CA, DAYS days, default 365). In production use your
# organisation's CA and keep ca.key offline. Existing files in OUT_DIR are overwritten.
set -euo pipefail

if [[ $# -lt 1 || $# -gt 2 || "$1" == "-h" || "$1" == "--help" ]]; then
    sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
    [[ $# -ge 1 && ( "$1" == "-h" || "$1" == "--help" ) ]] && exit 0 || exit 2
fi
OUT="$1"
N_SUPERNODES="${2:-0}"
DAYS="${DAYS:-365}"
SAN="IP:127.0.0.1,DNS:localhost${SERVER_SAN:+,$SERVER_SAN}"
if ! [[ "$N_SUPERNODES" =~ ^[0-9]+$ ]]; then
    echo "N_SUPERNODES must be a non-negative integer, got '$N_SUPERNODES'" >&2
    exit 2
fi
command -v openssl >/dev/null || { echo "openssl not found" >&2; exit 1; }

mkdir -p "$OUT"
cd "$OUT"
umask 077  # private keys readable by their owner only

# 1. The CA.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -sha256 -nodes -days "$DAYS" \
    -keyout ca.key -out ca.crt -subj "/CN=shopcast test CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    2>/dev/null

# 2. The SuperLink's key, a signing request and the certificate with the SAN.
cat > server.ext <<EXT
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=$SAN
EXT
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -sha256 -nodes -keyout server.key -out server.csr \
    -subj "/CN=shopcast superlink" 2>/dev/null
openssl x509 -req -sha256 -days "$DAYS" -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
    -extfile server.ext -out server.pem 2>/dev/null
rm -f server.csr server.ext ca.srl
chmod 600 ca.key server.key  # umask shapes new files only; a key that existed keeps its old mode otherwise
chmod 644 ca.crt server.pem

# 3. Optional SuperNode authentication keys (ECDSA P-384, OpenSSH format).
if (( N_SUPERNODES > 0 )); then
    command -v ssh-keygen >/dev/null || { echo "ssh-keygen not found (needed for SuperNode keys)" >&2; exit 1; }
    for ((i = 0; i < N_SUPERNODES; i++)); do
        rm -f "sn$i" "sn$i.pub"
        ssh-keygen -q -t ecdsa -b 384 -N "" -C "shopcast-supernode-$i" -f "sn$i"
        chmod 600 "sn$i"
        chmod 644 "sn$i.pub"
    done
fi

openssl verify -CAfile ca.crt server.pem >/dev/null
echo "wrote to $(pwd): ca.crt ca.key server.pem server.key$( (( N_SUPERNODES > 0 )) && printf ' sn0..sn%d(.pub)' $((N_SUPERNODES - 1)) ) (SAN: $SAN)"
