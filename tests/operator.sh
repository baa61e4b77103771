#!/usr/bin/env bash
# Drives the built daemon the way an operator would: runs every grpcurl line of the README's
# operator session exactly as printed, over the Unix socket and over TCP.
set -euo pipefail
cd "$(dirname "$0")/.."

work=$(mktemp -d)
trap 'kill "$pid" ${tls_pid:-} 2>/dev/null || true; rm -rf "$work"' EXIT

# Waits for a daemon's readiness line rather than for time: wait_ready STDOUT STDERR PID NAME.
wait_ready() {
  for _ in $(seq 1 600); do
    grep -q '"event":"ready"' "$1" && return 0
    kill -0 "$3" 2>/dev/null || { cat "$2" >&2; echo "$4 exited early" >&2; exit 1; }
    sleep 0.1
  done
  echo "$4 not ready" >&2
  exit 1
}

commands=$(sed -n '/<!-- operator-session:begin/,/<!-- operator-session:end/p' README.md | grep '^grpcurl ')
[ "$(printf '%s\n' "$commands" | wc -l)" -ge 7 ] || { echo "operator session not found in README.md" >&2; exit 1; }

# The README's commands use the default socket path and 127.0.0.1:50051. Start through
# `cargo run`, as the README does, so whatever cargo adds to the environment is exercised too;
# keep_on_exit=false leaves no pools behind in the default pools.dir for the next run to adopt.
cargo run --quiet --bin offloadd -- serve --tcp-addr 127.0.0.1:50051 --set pools.keep_on_exit=false >"$work/stdout" 2>"$work/stderr" &
pid=$!
wait_ready "$work/stdout" "$work/stderr" "$pid" daemon
# Signal the daemon itself, not cargo.
pid=$(sed -n 's/.*"pid":\([0-9]*\).*/\1/p' "$work/stdout" | head -n 1)

n=0
while IFS= read -r cmd; do
  n=$((n + 1))
  echo "\$ $cmd"
  out=$(eval "$cmd")
  printf '%s\n' "$out" | head -n 40
  case "$cmd" in
    *" list") grep -qx 'offloadd.v1.Offload' <<<"$out" && grep -qx 'grpc.health.v1.Health' <<<"$out" ;;
    *describe*) grep -q 'rpc GetInfo' <<<"$out" ;;
    *GetInfo) grep -q '"id": "cpu"' <<<"$out" && grep -q '"version"' <<<"$out" ;;
    *Health/Check) grep -q '"status": "SERVING"' <<<"$out" ;;
    *) echo "no expectation for: $cmd" >&2; exit 1 ;;
  esac || { echo "unexpected output from: $cmd" >&2; exit 1; }
done <<<"$commands"

# Mixture-of-experts scale with grpcurl's default flags (4 MiB messages): publish 200k tensors
# through CreateModelStream in pages, then read the whole table back page by page.
g() { grpcurl -plaintext -unix -authority localhost -d "$1" /tmp/offloadd/offloadd.sock "$2"; }
n_tensors=200000
g '{"name":"moe","device":"cpu","size_bytes":134217728}' offloadd.v1.Offload/CreatePool >/dev/null
python3 - "$n_tensors" >"$work/specs.json" <<'PY'
import json, sys
n, per = int(sys.argv[1]), 10000
for i in range(0, n, per):
    m = {"tensors": [{"name": f"model.layers.{j // 1000}.mlp.experts.{j % 1000}.w", "dtype": "U8", "shape": ["4"]}
                     for j in range(i, min(i + per, n))]}
    if i == 0:
        m.update(name="moe", pool="moe")
    print(json.dumps(m))
PY
# Rows of a table whose first page is in $work/page.json, following next_page_token: each next
# page is asked of method `$4` with `{"$1":"$2",$3"page_token":…}`.
rows_of() {
  local total=0 count token
  while :; do
    # Inside $(...) errexit does not hold: every failure returns, or a bad page loops forever.
    read -r count token < <(python3 -c 'import json,sys; m=json.load(open(sys.argv[1])); print(len(m.get("tensors",[])), m.get("nextPageToken","-"))' "$work/page.json") || return 1
    [ -n "$count" ] || return 1
    total=$((total + count))
    [ "$token" = "-" ] && break
    g "{\"$1\":\"$2\",$3\"page_token\":\"$token\"}" "$4" >"$work/page.json" || return 1
  done
  echo "$total"
}
g @ offloadd.v1.Offload/CreateModelStream <"$work/specs.json" >"$work/page.json"
# Only this answer carries the publication's token; WriteModel and SealModel need it.
read -r token first < <(python3 -c 'import json,sys; m=json.load(open(sys.argv[1])); print(m["publishToken"], m["tensors"][0].get("offset", "0"))' "$work/page.json")
# grpcurl 1.8.6 is built on grpc-go 1.44, whose client resets an answer over 64 KiB with
# FLOW_CONTROL_ERROR ("unexpected EOF") when the call's stream opens while a window increase is
# in flight (grpc-go issue 5358). The daemon's reflection answer is kept under the size that
# sets one off (src/grpc/reflection.rs); grpc-go's own frame log shows whether it did.
GODEBUG=http2debug=2 g '{"name":"moe","include_tensors":true}' offloadd.v1.Offload/GetModel >/dev/null 2>"$work/h2.log"
grep -q 'read DATA stream=3' "$work/h2.log" || { echo "no answer on the call's stream in grpc-go's frame log" >&2; exit 1; }
sed '/read DATA stream=3/q' "$work/h2.log" >"$work/h2.before"
if grep -q 'wrote SETTINGS.*INITIAL_WINDOW_SIZE' "$work/h2.before"; then
  echo "grpcurl grew its window before the call's answer (the reflection answer set it off)" >&2; exit 1
fi
rows=$(rows_of name moe '"include_tensors":true,' offloadd.v1.Offload/GetModel) || { echo "GetModel pages failed" >&2; exit 1; }
[ "$rows" -eq "$n_tensors" ] || { echo "grpcurl read $rows of $n_tensors rows" >&2; exit 1; }
# The first tensor's 4 bytes (base64 in grpcurl's JSON), then the seal; without the token, refused.
g "{\"name\":\"moe\",\"publish_token\":\"$token\",\"offset\":\"$first\",\"data\":\"AQIDBA==\"}" offloadd.v1.Offload/WriteModel | grep -q '"bytesWritten": "4"'
if g '{"name":"moe"}' offloadd.v1.Offload/SealModel 2>"$work/seal.err"; then
  echo "SealModel without the publish token was accepted" >&2; exit 1
fi
grep -q PermissionDenied "$work/seal.err" || { cat "$work/seal.err" >&2; exit 1; }
g "{\"name\":\"moe\",\"publish_token\":\"$token\"}" offloadd.v1.Offload/SealModel | grep -q MODEL_STATE_READY
# A lease on it: AttachWorker answers the first page, GetLeaseTensors the rest.
g '{"model":"moe","worker_name":"grpcurl","ttl_ms":300000}' offloadd.v1.Offload/AttachWorker >"$work/page.json"
lease=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["leaseId"])' "$work/page.json")
leased=$(rows_of lease_id "$lease" '' offloadd.v1.Offload/GetLeaseTensors) || { echo "GetLeaseTensors pages failed" >&2; exit 1; }
[ "$leased" -eq "$n_tensors" ] || { echo "grpcurl read $leased of $n_tensors lease rows" >&2; exit 1; }
g "{\"lease_id\":\"$lease\"}" offloadd.v1.Offload/DetachWorker >/dev/null
echo "grpcurl (default flags): published $n_tensors tensors with CreateModelStream, read all $rows rows of GetModel and $leased of a lease in pages"

# TLS as an operator sets it up: certificates from openssl, mutual TLS on a second daemon, and
# grpcurl with -cacert/-cert/-key (the deploy/README.md recipe).
tls="$work/tls"
mkdir -p "$tls"
ossl() { openssl "$@" 2>/dev/null; }
ossl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=offloadd-ca -keyout "$tls/ca.key" -out "$tls/ca.pem"
for who in server client; do
  ossl req -newkey rsa:2048 -nodes -subj "/CN=$who" -keyout "$tls/$who.key" -out "$tls/$who.csr"
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' >"$tls/$who.ext"
  ossl x509 -req -in "$tls/$who.csr" -CA "$tls/ca.pem" -CAkey "$tls/ca.key" -CAcreateserial -days 1 \
    -extfile "$tls/$who.ext" -out "$tls/$who.pem"
done
target/debug/offloadd serve --uds-path "$work/tls.sock" --pools-dir "$work/tls-pools" \
  --tcp-addr 127.0.0.1:0 --set pools.keep_on_exit=false \
  --set "server.tls_cert_file=$tls/server.pem" --set "server.tls_key_file=$tls/server.key" \
  --set "server.tls_client_ca_file=$tls/ca.pem" >"$work/tls.out" 2>"$work/tls.err" &
tls_pid=$!
wait_ready "$work/tls.out" "$work/tls.err" "$tls_pid" "TLS daemon"
addr=$(sed -n 's/.*"tcp":"\([^"]*\)".*/\1/p' "$work/tls.out")
grpcurl -cacert "$tls/ca.pem" -cert "$tls/client.pem" -key "$tls/client.key" "$addr" offloadd.v1.Offload/GetInfo | grep -q '"id": "cpu"'
! grpcurl -cacert "$tls/ca.pem" "$addr" offloadd.v1.Offload/GetInfo >/dev/null 2>&1 || { echo "TLS daemon served a client without a certificate" >&2; exit 1; }
! grpcurl -plaintext "$addr" offloadd.v1.Offload/GetInfo >/dev/null 2>&1 || { echo "TLS daemon served plaintext" >&2; exit 1; }
kill -TERM "$tls_pid"
wait "$tls_pid"
echo "grpcurl over mutual TLS: served with a client certificate, refused without one and in plaintext"

kill -TERM "$pid"
# Wait for the daemon (not our child: it runs under cargo) to exit.
for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
! kill -0 "$pid" 2>/dev/null || { echo "daemon still running after SIGTERM" >&2; exit 1; }
wait || true
[ ! -e /tmp/offloadd/offloadd.sock ] || { echo "socket left behind after SIGTERM" >&2; exit 1; }
echo "operator session: $n passed, 0 failed"
