#!/usr/bin/env bash
# Multi-host rehearsal on one machine: two network namespaces play two hosts.
#
#   host A (netns td-mh-a-<pid>, 10.213.7.1): redis-server (the ledger) + a producer
#   host B (netns td-mh-b-<pid>, 10.213.7.2): two trainer ranks (world size 2)
#
# The hosts are joined by a veth pair that exists only between the two
# namespaces created here; the 10.213.7.0/24 addresses live only inside them,
# so no traffic touches the machine's own interfaces. The trainers reach the
# ledger over that link (redis://:<password>@10.213.7.1:<port>/0); the sample
# bytes go through a shared directory store (file://), which both "hosts" see
# because namespaces share the filesystem. At the end an audit reads the ledger
# and checks that every sample was trained exactly once.
#
#   sudo examples/multihost_rehearsal.sh            # SAMPLES=240 BATCH=8 WORKERS=1 by default
#
# Needs root (or CAP_NET_ADMIN + CAP_SYS_ADMIN) for `ip netns`, and redis-server.
# Where namespaces are not permitted it prints "skipped: <reason>" and exits 0.
# Everything it starts (processes, namespaces, the temp dir) is removed on exit.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # the checkout's torch_dataflow, installed or not
SAMPLES="${SAMPLES:-240}"
BATCH="${BATCH:-8}"
WORKERS="${WORKERS:-1}"
PORT="${PORT:-6390}"
NSA="td-mh-a-$$"
NSB="td-mh-b-$$"
VA="tdva$$"
VB="tdvb$$"
VA="${VA:0:15}"
VB="${VB:0:15}"
IPA=10.213.7.1
IPB=10.213.7.2

skip() { echo "skipped: $*"; exit 0; }

command -v ip >/dev/null 2>&1 || skip "the ip command (iproute2) is not installed"
command -v redis-server >/dev/null 2>&1 || skip "redis-server is not installed (apt-get install -y redis-server)"

PIDS=()
WORK=""
NETNS_MADE=()
cleanup() {
  local rc=$?
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  for ns in "${NETNS_MADE[@]}"; do ip netns del "$ns" 2>/dev/null || true; done  # takes its veth end along
  [ -n "$WORK" ] && rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if ! err="$(ip netns add "$NSA" 2>&1)"; then
  skip "network namespaces are not permitted here (ip netns add: ${err:-failed})"
fi
NETNS_MADE+=("$NSA")
ip netns add "$NSB"
NETNS_MADE+=("$NSB")

# The link: created inside A, one end moved to B. Never in the machine's own namespace.
ip -n "$NSA" link add "$VA" type veth peer name "$VB"
ip -n "$NSA" link set "$VB" netns "$NSB"
ip -n "$NSA" addr add "$IPA/24" dev "$VA"
ip -n "$NSB" addr add "$IPB/24" dev "$VB"
for ns in "$NSA" "$NSB"; do ip -n "$ns" link set lo up; done
ip -n "$NSA" link set "$VA" up
ip -n "$NSB" link set "$VB" up
if command -v ping >/dev/null 2>&1; then ip netns exec "$NSB" ping -c 1 -W 5 "$IPA" >/dev/null; fi

WORK="$(mktemp -d /tmp/td-multihost.XXXXXX)"
PASSWORD="$("$PY" -c 'import secrets; print(secrets.token_hex(16))')"
LEDGER="redis://:$PASSWORD@$IPA:$PORT/0?namespace=rehearsal&secret=rehearsal-secret"
STORE="file://$WORK/store"
mkdir -p "$WORK/store" "$WORK/redis"

# ---- host A: the ledger server, listening on A's address only
ip netns exec "$NSA" redis-server --bind "$IPA" --port "$PORT" --requirepass "$PASSWORD" \
  --dir "$WORK/redis" --appendonly yes --appendfsync always --save '' --daemonize no \
  --logfile "$WORK/redis.log" &
PIDS+=($!)
for _ in $(seq 100); do
  if ip netns exec "$NSB" "$PY" -c "import socket; socket.create_connection(('$IPA', $PORT), 0.2).close()" \
      2>/dev/null; then break; fi
  sleep 0.1
done

t0=$(date +%s.%N)
# ---- host B: two trainer ranks, started first: they wait for the stream
for rank in 0 1; do
  ip netns exec "$NSB" "$PY" "$HERE/multihost_trainer.py" train --store "$STORE" --ledger "$LEDGER" \
    --rank "$rank" --world 2 --batch "$BATCH" --workers "$WORKERS" --out "$WORK/rank$rank.txt" \
    > "$WORK/rank$rank.log" 2>&1 &
  PIDS+=($!)
  TRAINERS[$rank]=$!
done
# ---- host A: the producer
ip netns exec "$NSA" "$PY" "$HERE/multihost_producer.py" --store "$STORE" --ledger "$LEDGER" \
  --samples "$SAMPLES" > "$WORK/producer.log" 2>&1 &
PRODUCER=$!
PIDS+=("$PRODUCER")

status=0
if ! wait "$PRODUCER"; then  # the trainers would wait for a stream that never closes: stop here
  echo "producer failed:"; cat "$WORK/producer.log"; exit 1
fi
cat "$WORK/producer.log"
for rank in 0 1; do
  wait "${TRAINERS[$rank]}" || { echo "trainer rank $rank failed:"; status=1; }
  cat "$WORK/rank$rank.log"
done
[ "$status" = 0 ] || exit 1
elapsed=$("$PY" -c "import time; print(f'{time.time() - $t0:.1f}')")

# ---- the audit, from host B over the link
ip netns exec "$NSB" "$PY" "$HERE/multihost_trainer.py" audit --ledger "$LEDGER" --expect "$SAMPLES" \
  "$WORK/rank0.txt" "$WORK/rank1.txt" || status=1
rx=$(ip -n "$NSB" -s link show "$VB" | awk '/RX:/{getline; print $1; exit}')
tx=$(ip -n "$NSB" -s link show "$VB" | awk '/TX:/{getline; print $1; exit}')
echo "link: host B received $rx bytes and sent $tx bytes over $VB ($IPB <-> $IPA)"
echo "summary: $SAMPLES samples, producer on $NSA ($IPA), 2 trainer ranks on $NSB ($IPB), batch $BATCH," \
  "$WORKERS DataLoader worker(s) per rank, Redis ledger with AOF over the veth link, store $STORE;" \
  "$elapsed s; $([ "$status" = 0 ] && echo 'every sample trained exactly once' || echo 'AUDIT FAILED')"
exit "$status"
