#!/usr/bin/env bash
# Make the CA, the SuperLink's TLS certificate and one key pair per box.
# Usage: deploy/make_creds.sh SERVER_HOST BOX_NAME...    e.g. deploy/make_creds.sh server.lan box-0 box-1
# Writes deploy/creds/: ca.crt (every box), server.pem/.key (server only), <box>.key (that box only), <box>.pub.
source "$(dirname "$0")/common.sh"
[ $# -ge 2 ] || die "usage: deploy/make_creds.sh SERVER_HOST BOX_NAME..."
host="$1"; shift
"$PY" -m server.creds --out "$ROOT/deploy/creds" --host "$host" --nodes "$@"
