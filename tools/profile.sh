#!/usr/bin/env bash
# Where the server's time goes under the 1:1 throughput load (docs/benchmarks.md, "Profiles").
#
#   tools/profile.sh flamegraph OUT.svg   perf (DWARF call graphs) of `courier serve` while
#                                         `courier bench throughput` runs, folded by inferno
#   tools/profile.sh callgrind OUT.txt    instruction counts of `courier serve` under callgrind
#                                         for a fixed load (2 pairs, 1,000 messages), with the
#                                         instructions per message and the top functions
#                                         (tools/callgrind-functions.py)
#
# Needs: linux-perf and `cargo install inferno` (flamegraph), valgrind and python3 (callgrind).
# Uses the release build in target/release (built if missing). Ports 18180/18181 on 127.0.0.1.
set -euo pipefail

mode=${1:?usage: tools/profile.sh flamegraph|callgrind OUT}
out=${2:?usage: tools/profile.sh flamegraph|callgrind OUT}
root=$(cd "$(dirname "$0")/.." && pwd)
bin=$root/target/release/courier
[ -x "$bin" ] || cargo build --release -p courier --manifest-path "$root/Cargo.toml"
work=$(mktemp -d)
server_pid=
cleanup() {
    # Waits for the server: one left running under valgrind would hold the port of the next run.
    [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
no_limits=(--user-sends-per-sec 0 --connection-frames-per-sec 0 --group-sends-per-sec 0)

wait_ready() {
    for _ in $(seq 600); do
        curl -sf "http://127.0.0.1:$1/readyz" >/dev/null && return 0
        sleep 0.1
    done
    echo "server on port $1 did not become ready" >&2
    exit 1
}

bench() {
    "$bin" bench --url "ws://127.0.0.1:$1" --data-dir "$work/data" --no-progress throughput "${@:2}"
}

case $mode in
flamegraph)
    "$bin" serve --listen 127.0.0.1:18180 --data-dir "$work/data" "${no_limits[@]}" \
        >"$work/server.log" 2>&1 &
    server_pid=$!
    wait_ready 18180
    bench 18180 --pairs 8 --rate 0 --window 64 --duration 12s >"$work/bench.txt" &
    bench_pid=$!
    sleep 3
    perf record -F 499 --call-graph dwarf,16384 -p "$server_pid" -o "$work/perf.data" -- sleep 5
    wait "$bench_pid"
    grep acked_msgs_per_sec "$work/bench.txt"
    perf script -i "$work/perf.data" 2>/dev/null | inferno-collapse-perf >"$work/folded"
    inferno-flamegraph --minwidth 0.2 --title "courier serve, 1:1 throughput (8 pairs, window 64)" \
        <"$work/folded" >"$out"
    echo "flamegraph written to $out"
    ;;
callgrind)
    # Leases far longer than the run: valgrind's slow clock would otherwise spread the renewal
    # of every shard's two ownership records (every third of --shard-lease) over few messages.
    # At the store's background priority: valgrind runs one thread at a time, and a fjall
    # worker the store put at nice 19 while the others kept 0 held that turn while the kernel
    # kept it off the CPU (minutes to start, no hello within a minute). Started at nice 19,
    # every thread has the same priority and the store leaves it so. With valgrind's fair
    # scheduling (threads take the turn in the order they ask for it) instead of its default,
    # where a thread that spins (fjall's idle workers, tokio's) kept the turn: a run takes ~12 s
    # instead of 1.5-8 minutes, and the server no longer misses the bench's first minute.
    nice -n 19 valgrind --tool=callgrind --fair-sched=yes --callgrind-out-file="$work/callgrind.out" \
        "$bin" serve --listen 127.0.0.1:18181 --data-dir "$work/data" "${no_limits[@]}" \
        --shard-lease 10m >"$work/server.log" 2>&1 &
    server_pid=$!
    wait_ready 18181
    # Not counted: a first run, by which time the node has taken its shards' leases and the
    # push notifier has made its first pass over every shard's outbox (~25M instructions,
    # which otherwise fell inside the count in some runs and not in others).
    bench 18181 --pairs 2 --rate 200 --duration 3s >"$work/warmup.txt"
    # Counted from here: connect, 1,000 messages end to end, and their acks.
    callgrind_control --zero "$server_pid" >/dev/null
    bench 18181 --pairs 2 --rate 200 --duration 5s >"$work/bench.txt"
    callgrind_control --dump "$server_pid" >/dev/null
    messages=$(sed -n 's/.*counts: acked=\([0-9]*\).*/\1/p' "$work/bench.txt")
    dump=$(ls -t "$work"/callgrind.out.* | head -1)
    total=$(callgrind_annotate "$dump" | sed -n 's/^\([0-9,]*\) .*PROGRAM TOTALS.*/\1/p' | tr -d ,)
    {
        echo "messages: $messages"
        echo "instructions: $total"
        echo "instructions per message: $((total / messages))"
        echo
        # Per function with its inlined code merged, per message: Courier's functions and
        # those of the store, JSON and WebSocket crates under them, then every function's own.
        "$root/tools/callgrind-functions.py" "$dump" --per "$messages" --top 50 \
            --only '^<?courier|fjall::|lsm_tree::|serde_json::|tungstenite::|axum::|mi_'
    } >"$out"
    head -3 "$out"
    echo "report written to $out"
    ;;
*)
    echo "unknown mode $mode (flamegraph or callgrind)" >&2
    exit 2
    ;;
esac
