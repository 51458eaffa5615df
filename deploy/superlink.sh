#!/usr/bin/env bash
# Start the SuperLink on the server, with TLS and SuperNode authentication, and point this
# machine's flwr CLI at it. Usage: deploy/superlink.sh [PORT]   (default 9093)
# Without TLS/auth (a trusted test network only): deploy/superlink.sh --insecure-plaintext [PORT]
source "$(dirname "$0")/common.sh"
insecure=0
if [ "${1:-}" = "--insecure-plaintext" ]; then insecure=1; shift; fi
port="${1:-9093}"
creds="$ROOT/deploy/creds"
mkdir -p "$FLWR_HOME"
conn="[superlink]\ndefault = \"$FEDERATION\"\n\n[superlink.$FEDERATION]\naddress = \"127.0.0.1:$port\"\n"
if [ $insecure = 1 ]; then
  printf "$conn""insecure = true\n" > "$FLWR_HOME/config.toml"
  exec "$BIN/flower-superlink" --insecure --host 0.0.0.0 --port "$port" --disable-runtime-dependency-installation
fi
[ -f "$creds/ca.crt" ] || die "no credentials in $creds; run deploy/make_creds.sh first"
printf "$conn""root-certificates = \"$creds/ca.crt\"\n" > "$FLWR_HOME/config.toml"
exec "$BIN/flower-superlink" --ssl-ca-certfile "$creds/ca.crt" --ssl-certfile "$creds/server.pem" \
  --ssl-keyfile "$creds/server.key" --enable-supernode-auth --host 0.0.0.0 --port "$port" \
  --disable-runtime-dependency-installation
