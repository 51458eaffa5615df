#!/usr/bin/env bash
# Start this box's SuperNode. Usage (on the box):
#   deploy/supernode.sh BOX_NAME SERVER_HOST:PORT DATA.npz STORE_DIR [CREDS_DIR]
# DATA.npz comes from 'papm shard'; CREDS_DIR holds ca.crt and BOX_NAME.key (default deploy/creds).
# Without TLS/auth (a trusted test network only): PAPM_INSECURE_PLAINTEXT=1 deploy/supernode.sh ...
# Two SuperNodes on one machine need distinct local ClientApp ports: PAPM_NODE_PORT=9095 deploy/supernode.sh ...
# This box's own budget and runtime (they win over the server's sim.budgets):
#   PAPM_BUDGET=2.5ms PAPM_RUNTIME=onnxruntime deploy/supernode.sh ...   (budget: 0.77 | 1.2MB | 2.5ms)
source "$(dirname "$0")/common.sh"
[ $# -ge 4 ] || die "usage: deploy/supernode.sh BOX_NAME SERVER_HOST:PORT DATA.npz STORE_DIR [CREDS_DIR]"
name="$1"; link="$2"; data="$(realpath -m "$3")"; store="$(realpath -m "$4")"; creds="${5:-$ROOT/deploy/creds}"
[ -f "$data" ] || die "no data file $data; make it with 'papm shard'"
cfg="name=\"$name\" data=\"$data\" store=\"$store\""
[ -n "${PAPM_BUDGET:-}" ] && cfg+=" budget=\"$PAPM_BUDGET\""
[ -n "${PAPM_RUNTIME:-}" ] && cfg+=" runtime=\"$PAPM_RUNTIME\""
port=(${PAPM_NODE_PORT:+--port "$PAPM_NODE_PORT"})
if [ "${PAPM_INSECURE_PLAINTEXT:-0}" = 1 ]; then
  exec "$BIN/flower-supernode" --insecure --superlink "$link" --node-config "$cfg" "${port[@]}"
fi
[ -f "$creds/$name.key" ] || die "no private key $creds/$name.key for this box"
exec "$BIN/flower-supernode" --root-certificates "$creds/ca.crt" --auth-supernode-private-key "$creds/$name.key" \
  --superlink "$link" --node-config "$cfg" "${port[@]}"
