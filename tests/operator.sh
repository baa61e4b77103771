#!/usr/bin/env bash
# Drives the built daemon the way an operator would: runs every grpcurl line of the README's
# operator session exactly as printed, over the Unix socket and over TCP.
set -euo pipefail
cd "$(dirname "$0")/.."

work=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT

commands=$(sed -n '/<!-- operator-session:begin/,/<!-- operator-session:end/p' README.md | grep '^grpcurl ')
[ "$(printf '%s\n' "$commands" | wc -l)" -ge 7 ] || { echo "operator session not found in README.md" >&2; exit 1; }

# The README's commands use the default socket path and 127.0.0.1:50051. Start through
# `cargo run`, as the README does, so whatever cargo adds to the environment is exercised too.
cargo run --quiet --bin offloadd -- serve --tcp-addr 127.0.0.1:50051 >"$work/stdout" 2>"$work/stderr" &
pid=$!
# Wait for the readiness line rather than for time.
for _ in $(seq 1 600); do
  grep -q '"event":"ready"' "$work/stdout" && break
  kill -0 "$pid" 2>/dev/null || { cat "$work/stderr" >&2; echo "daemon exited early" >&2; exit 1; }
  sleep 0.1
done
grep -q '"event":"ready"' "$work/stdout" || { echo "daemon not ready" >&2; exit 1; }
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

kill -TERM "$pid"
# Wait for the daemon (not our child: it runs under cargo) to exit.
for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
! kill -0 "$pid" 2>/dev/null || { echo "daemon still running after SIGTERM" >&2; exit 1; }
wait || true
[ ! -e /tmp/offloadd/offloadd.sock ] || { echo "socket left behind after SIGTERM" >&2; exit 1; }
echo "operator session: $n passed, 0 failed"
