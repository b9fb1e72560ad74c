#!/usr/bin/env bash
# Records a trace like examples/demo-trace.jsonl: `maitre serve --demo` (the
# project's model of Ollama: 2 slots, 20 ms a token) with the policy of
# examples/policy.toml plus a [trace] table, under three batch clients that
# send jobs back to back (20-59 tokens, answered whole) while real-time chat
# streams (10-49 tokens) arrive every 1-4 s.
#
#   examples/record-trace.sh [SECONDS] [OUT]     # defaults: 120 examples/demo-trace.jsonl
#
# Needs bash and curl; loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
run_for=${1:-120}
out=${2:-examples/demo-trace.jsonl}
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

sed -e 's/^listen = .*/listen = "127.0.0.1:0"/' \
    -e 's/^admin_listen = .*/admin_listen = "127.0.0.1:0"/' \
    examples/policy.toml > "$work/policy.toml"
printf '\n[trace]\npath = "trace.jsonl"\n' >> "$work/policy.toml"

cargo build --release -q -p maitre
target/release/maitre serve --policy "$work/policy.toml" --demo --ready-file "$work/ready" 2>"$work/log" &
maitre=$!
pids+=("$maitre")
for _ in $(seq 300); do [ -s "$work/ready" ] && break; sleep 0.1; done
[ -s "$work/ready" ] || { cat "$work/log"; exit 1; }
url="http://$(sed 's/.*"listen":"\([^"]*\)".*/\1/' "$work/ready")"

end=$((SECONDS + run_for))
batch() {
  while [ "$SECONDS" -lt "$end" ]; do
    n=$((20 + RANDOM % 40))
    curl -s -o /dev/null -H 'X-Priority: batch' "$url/api/generate" \
      -d "{\"model\":\"fake\",\"prompt\":\"summarise\",\"stream\":false,\"options\":{\"num_predict\":$n}}" || true
  done
}
realtime() {
  while [ "$SECONDS" -lt "$end" ]; do
    sleep $((1 + RANDOM % 4))
    n=$((10 + RANDOM % 40))
    curl -s -o /dev/null -H 'X-Priority: realtime' "$url/api/chat" \
      -d "{\"model\":\"fake\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"options\":{\"num_predict\":$n}}" &
  done
  wait
}
loads=()
for _ in 1 2 3; do batch & loads+=($!); done
realtime & loads+=($!)
wait "${loads[@]}"
kill -TERM "$maitre"
wait "$maitre" || true
cp "$work/trace.jsonl" "$out"
echo "recorded $(wc -l < "$out") requests to $out"
