#!/usr/bin/env bash
# Allow boxes to join: register their public keys with the running SuperLink (on the server).
# Usage: deploy/register.sh BOX_NAME...
source "$(dirname "$0")/common.sh"
[ $# -ge 1 ] || die "usage: deploy/register.sh BOX_NAME..."
for box in "$@"; do
  pub="$ROOT/deploy/creds/$box.pub"
  [ -f "$pub" ] || die "no public key $pub; run deploy/make_creds.sh first"
  "$BIN/flwr" supernode register "$pub" "$FEDERATION"
done
"$BIN/flwr" supernode list "$FEDERATION"
