#!/usr/bin/env bash
# Benchmark report for a running `pgwarden demo` cluster (not a test: it
# prints figures next to their targets and never fails on a missed target).
#
#   bash bench/run.sh
#
# What it does:
#   1. cargo build --release, then starts `pgwarden demo` on free loopback
#      ports in a new temporary directory, and measures the time from launch
#      to the first write accepted through HAProxy (the demo's own
#      "cluster ready" line, and independently with psql from here).
#   2. Agent resident memory (VmRSS) and CPU while idle (utime+stime over
#      IDLE_SECS seconds, in % of one core).
#   3. Health-check throughput with wrk against the leader's /primary
#      (-c32 and -c4) and a replica's /replica.
#   4. Stops the demo with SIGTERM, waits for it, and checks that no process
#      of its directory (etcd, HAProxy, agents, PostgreSQL) is left.
#   5. Prints a markdown table of the figures against the targets.
#
# Environment (all optional):
#   IDLE_SECS=60        idle CPU measurement window
#   SETTLE_SECS=5       pause after all members are up before the idle window
#   WRK_SECS=15         duration of each wrk run
#   WRK_THREADS=2       wrk threads
#   BASE_PORT=N         use ports N..N+11 instead of picking a free block
#   READY_TIMEOUT=300   seconds to wait for the first write
#   KEEP_DIR=1          keep the demo directory (it is kept anyway on failure)
#   SKIP_BUILD=1        do not run cargo build --release
#
# Progress goes to stderr, the report to stdout.

set -euo pipefail

IDLE_SECS=${IDLE_SECS:-60}
SETTLE_SECS=${SETTLE_SECS:-5}
WRK_SECS=${WRK_SECS:-15}
WRK_THREADS=${WRK_THREADS:-2}
READY_TIMEOUT=${READY_TIMEOUT:-300}
STOP_TIMEOUT=${STOP_TIMEOUT:-150} # the demo itself allows 90 s for agents + 10 s each for HAProxy/etcd
MEMBERS=3

# Targets.
TARGET_RSS_MB=20
TARGET_IDLE_CPU_PCT=1
TARGET_PRIMARY_RPS=20000
TARGET_PRIMARY_P99_MS=2

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
BIN=$ROOT/target/release/pgwarden

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

for tool in cargo wrk psql jq ss awk pgrep curl getconf realpath; do
    command -v "$tool" >/dev/null || die "\`$tool\` not found (wrk: apt-get install -y wrk)"
done

# --- state used by the cleanup trap -------------------------------------------
DIR=""
DEMO_PID=""
DEMO_OUT=""
DEMO_ERR=""
STOPPED=0
FAILED=1 # cleared at the very end of a complete run

# PIDs of processes belonging to the demo directory: command line mentions it
# (demo, etcd, HAProxy, agents, postmasters) or working directory inside it
# (every PostgreSQL process chdirs into its data directory).
dir_pids() {
    local p pid cwd cmd
    [[ -n $DIR ]] || return 0
    for p in /proc/[0-9]*; do
        pid=${p#/proc/}
        [[ $pid == "$$" || $pid == "$BASHPID" ]] && continue
        cwd=$(readlink "$p/cwd" 2>/dev/null) || cwd=""
        cmd=$(tr '\0' ' ' 2>/dev/null <"$p/cmdline") || cmd=""
        if [[ $cwd == "$DIR" || $cwd == "$DIR"/* || $cmd == *"$DIR/"* || $cmd == *"$DIR "* ]]; then
            # Skip ourselves and our own subshells (same command line as us).
            [[ $cmd == *"bench/run.sh"* ]] && continue
            echo "$pid"
        fi
    done
}

STOP_SECS=""
LEFTOVERS=""
stop_demo() {
    # SIGTERM the demo (it stops everything it started) and wait for it.
    [[ $STOPPED == 1 ]] && return 0
    STOPPED=1
    if [[ -n $DEMO_PID ]] && kill -0 "$DEMO_PID" 2>/dev/null; then
        log "stopping the demo (SIGTERM to pid $DEMO_PID)"
        local t0=$EPOCHREALTIME
        kill -TERM "$DEMO_PID" 2>/dev/null || true
        local deadline=$((SECONDS + STOP_TIMEOUT))
        while kill -0 "$DEMO_PID" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
        if kill -0 "$DEMO_PID" 2>/dev/null; then
            log "the demo did not exit within ${STOP_TIMEOUT}s; SIGKILL"
            kill -KILL "$DEMO_PID" 2>/dev/null || true
            STOP_SECS="timeout"
        else
            STOP_SECS=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN{printf "%.1f", b-a}')
        fi
        wait "$DEMO_PID" 2>/dev/null || true
    fi
    # PostgreSQL may take a moment to exit after its agent; give it a few s.
    local i
    for i in $(seq 50); do
        LEFTOVERS=$(dir_pids | tr '\n' ' ')
        [[ -z ${LEFTOVERS// /} ]] && break
        sleep 0.2
    done
    LEFTOVERS=${LEFTOVERS%% }
    if [[ -n ${LEFTOVERS// /} ]]; then
        log "processes of $DIR still running after the demo exited:"
        local p
        for p in $LEFTOVERS; do
            log "  $p: $(tr '\0' ' ' 2>/dev/null <"/proc/$p/cmdline")"
        done
    fi
}

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    [[ -n $NAP_PID ]] && kill "$NAP_PID" 2>/dev/null
    stop_demo
    if [[ -n ${LEFTOVERS// /} ]]; then
        # Processes we started (indirectly) and the demo failed to stop.
        log "terminating leftovers: $LEFTOVERS"
        kill -TERM $LEFTOVERS 2>/dev/null
        sleep 5
        kill -KILL $(dir_pids) 2>/dev/null
        ((rc == 0)) && rc=1
    fi
    if [[ -n $DIR && -d $DIR ]]; then
        if [[ ${KEEP_DIR:-0} == 1 || $rc != 0 || $FAILED == 1 ]]; then
            log "demo directory kept: $DIR (demo stdout: $DEMO_OUT, stderr: $DEMO_ERR)"
        else
            rm -rf "$DIR" "$DEMO_OUT" "$DEMO_ERR"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- helpers --------------------------------------------------------------------
# A sleep that a trapped signal interrupts at once (bash defers traps until a
# foreground command ends, `wait` it does not).
NAP_PID=""
nap() {
    sleep "$1" &
    NAP_PID=$!
    wait "$NAP_PID"
    NAP_PID=""
}

# A port is free if no TCP socket (listening or not) uses it locally.
port_block_free() {
    local base=$1 n=$2
    ss -Htan | awk -v lo="$base" -v hi="$((base + n - 1))" '
        { split($4, a, ":"); p = a[length(a)] + 0; if (p >= lo && p <= hi) bad = 1 }
        END { exit bad ? 1 : 0 }'
}

pick_ports() {
    # Twelve consecutive ports below the ephemeral range (32768+), so that
    # outgoing connections cannot take them between picking and binding.
    local n=12 try base
    if [[ -n ${BASE_PORT:-} ]]; then
        port_block_free "$BASE_PORT" "$n" || die "ports $BASE_PORT..$((BASE_PORT + n - 1)) are not all free"
        echo "$BASE_PORT"
        return
    fi
    for try in $(seq 100); do
        base=$((20000 + (RANDOM % 1000) * 12))
        if port_block_free "$base" "$n"; then
            echo "$base"
            return
        fi
    done
    die "no block of $n free ports found in 20000-31999"
}

# /proc/PID/stat fields after the ")" that ends the command name: state is
# field 3 overall, utime 14, stime 15.
cpu_ticks() {
    local stat
    stat=$(<"/proc/$1/stat")
    stat=${stat##*) }
    # shellcheck disable=SC2086
    set -- $stat
    echo $((${12} + ${13}))
}

parent_pid() {
    local stat
    stat=$(<"/proc/$1/stat")
    stat=${stat##*) }
    # shellcheck disable=SC2086
    set -- $stat
    echo "$2"
}

status_kb() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }

mb() { awk -v kb="$1" 'BEGIN { printf "%.1f", kb / 1024 }'; }

# "1.23ms" / "456.00us" / "1.20s" -> milliseconds
to_ms() {
    awk -v v="$1" 'BEGIN {
        if (v ~ /us$/) { sub(/us$/, "", v); printf "%.2f", v / 1000 }
        else if (v ~ /ms$/) { sub(/ms$/, "", v); printf "%.2f", v }
        else if (v ~ /m$/) { sub(/m$/, "", v); printf "%.2f", v * 60000 }
        else if (v ~ /s$/) { sub(/s$/, "", v); printf "%.2f", v * 1000 }
        else printf "nan" }'
}

# 12345.6 -> 12,346
thousands() {
    awk -v n="$1" 'BEGIN { s = sprintf("%.0f", n); out = "";
        while (length(s) > 3) { out = "," substr(s, length(s) - 2) out; s = substr(s, 1, length(s) - 3) }
        print s out }'
}

verdict() { # verdict VALUE OP TARGET -> pass / MISS
    awk -v v="$1" -v op="$2" -v t="$3" 'BEGIN {
        ok = (op == "le") ? (v + 0 <= t + 0) : (v + 0 >= t + 0)
        print ok ? "pass" : "**MISS**" }'
}

# run_wrk NAME CONNECTIONS URL -> sets WRK_<NAME>_{RPS,P50,P99,NON2XX,ERRORS}
run_wrk() {
    local name=$1 conns=$2 url=$3 out
    log "wrk -t$WRK_THREADS -c$conns -d${WRK_SECS}s --latency $url"
    out=$(wrk -t"$WRK_THREADS" -c"$conns" -d"${WRK_SECS}s" --latency "$url")
    printf '%s\n' "$out" | sed 's/^/    /' >&2
    local rps p50 p99 non2xx errors
    rps=$(printf '%s\n' "$out" | awk '/^Requests\/sec:/ { print $2 }')
    p50=$(to_ms "$(printf '%s\n' "$out" | awk '$1 == "50%" { print $2 }')")
    p99=$(to_ms "$(printf '%s\n' "$out" | awk '$1 == "99%" { print $2 }')")
    non2xx=$(printf '%s\n' "$out" | awk '/Non-2xx or 3xx responses:/ { print $NF }')
    errors=$(printf '%s\n' "$out" | awk '/Socket errors:/ { sub(/.*Socket errors: /, ""); print }')
    [[ -n $rps ]] || die "could not parse wrk output"
    printf -v "WRK_${name}_RPS" '%s' "$rps"
    printf -v "WRK_${name}_P50" '%s' "$p50"
    printf -v "WRK_${name}_P99" '%s' "$p99"
    printf -v "WRK_${name}_NON2XX" '%s' "${non2xx:-0}"
    printf -v "WRK_${name}_ERRORS" '%s' "${errors:-none}"
}

# --- 1. build and start ---------------------------------------------------------
if [[ ${SKIP_BUILD:-0} != 1 ]]; then
    log "cargo build --release"
    cargo build --release >&2
fi
[[ -x $BIN ]] || die "$BIN not found"
GIT_REV=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
GIT_DIRTY=$(git status --porcelain 2>/dev/null | wc -l || true)
BIN_SHA=$(sha256sum "$BIN" | cut -c1-12)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
log "binary $BIN (sha256 $BIN_SHA), commit $GIT_REV with $GIT_DIRTY uncommitted paths; load average $LOAD_START"

BASE=$(pick_ports)
RW_PORT=$BASE
RO_PORT=$((BASE + 1))
STATS_PORT=$((BASE + 2))
PG_BASE=$((BASE + 3))  # members use PG_BASE+1..+3
API_BASE=$((BASE + 6)) # members use API_BASE+1..+3
ETCD_PORT=$((BASE + 10)) # peer port ETCD_PORT+1
DIR=$(realpath "$(mktemp -d /tmp/pgwarden-bench.XXXXXXXX)")
DEMO_OUT=$DIR.stdout
DEMO_ERR=$DIR.stderr
log "demo directory $DIR, ports $BASE..$((BASE + 11))"

DEMO_CMD=("$BIN" demo --dir "$DIR" --members "$MEMBERS"
    --rw-port "$RW_PORT" --ro-port "$RO_PORT" --stats-port "$STATS_PORT"
    --pg-base-port "$PG_BASE" --api-base-port "$API_BASE" --etcd-port "$ETCD_PORT")
T0=$EPOCHREALTIME
"${DEMO_CMD[@]}" >"$DEMO_OUT" 2>"$DEMO_ERR" &
DEMO_PID=$!
log "started: ${DEMO_CMD[*]} (pid $DEMO_PID)"

# Wait for both the demo's "cluster ready" line and our own psql write.
DEMO_READY_SECS=""
PSQL_READY_SECS=""
PSQL_TRIES=0
PW=""
CFG1=$DIR/node1/pgwarden.toml
deadline=$((SECONDS + READY_TIMEOUT))
while [[ -z $DEMO_READY_SECS || -z $PSQL_READY_SECS ]]; do
    if ! kill -0 "$DEMO_PID" 2>/dev/null; then
        tail -n 20 "$DEMO_ERR" >&2 || true
        die "the demo exited before the cluster was ready"
    fi
    ((SECONDS < deadline)) || die "no write accepted within ${READY_TIMEOUT}s"
    if [[ -z $DEMO_READY_SECS ]]; then
        line=$(grep -m1 '^cluster ready: first write accepted through HAProxy port' "$DEMO_OUT" || true)
        if [[ -n $line ]]; then
            DEMO_READY_SECS=$(sed -E 's/.* after ([0-9.]+)s.*/\1/' <<<"$line")
            log "demo reports: $line"
        fi
        if grep -q 'the cluster did not accept a write' "$DEMO_ERR"; then
            die "$(grep -m1 'the cluster did not accept a write' "$DEMO_ERR")"
        fi
    fi
    if [[ -z $PSQL_READY_SECS ]]; then
        if [[ -z $PW && -s $CFG1 ]]; then
            PW=$(awk '/^\[/ { sec = $0 } sec == "[postgresql.authentication.superuser]" && $1 == "password" {
                     sub(/^[^"]*"/, ""); sub(/".*$/, ""); print; exit }' "$CFG1")
        fi
        if [[ -n $PW ]]; then
            PSQL_TRIES=$((PSQL_TRIES + 1))
            if PGPASSWORD=$PW PGCONNECT_TIMEOUT=2 psql -X -q -h 127.0.0.1 -p "$RW_PORT" -U postgres -d postgres \
                -v ON_ERROR_STOP=1 \
                -c "CREATE TABLE IF NOT EXISTS pgwarden_bench_probe (id serial PRIMARY KEY, at timestamptz DEFAULT now()); INSERT INTO pgwarden_bench_probe DEFAULT VALUES" \
                >/dev/null 2>&1; then
                PSQL_READY_SECS=$(awk -v a="$T0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f", b - a }')
                log "psql: first write through HAProxy port $RW_PORT after ${PSQL_READY_SECS}s ($PSQL_TRIES tries)"
            fi
        fi
    fi
    sleep 0.1
done

# --- 2. agents: memory and idle CPU -----------------------------------------------
list_json() { "$BIN" -c "$CFG1" list --format json 2>/dev/null; }

# All members up (leader running, replicas streaming) before measuring idle.
log "waiting for every member to be up (leader running, replicas streaming)"
deadline=$((SECONDS + 120))
while :; do
    up=$(list_json | jq '[.[] | select((.role == "leader" and .state == "running")
                                       or (.role == "replica" and .state == "streaming"))] | length' 2>/dev/null || echo 0)
    [[ $up == "$MEMBERS" ]] && break
    ((SECONDS < deadline)) || die "only $up of $MEMBERS members up after 120 s: $(list_json || true)"
    sleep 0.5
done
LIST=$(list_json)
LEADER=$(jq -r '[.[] | select(.role == "leader")][0].name' <<<"$LIST")
LEADER_API=$(jq -r '[.[] | select(.role == "leader")][0].api_url' <<<"$LIST")
REPLICA=$(jq -r '[.[] | select(.role == "replica")][0].name' <<<"$LIST")
REPLICA_API=$(jq -r '[.[] | select(.role == "replica")][0].api_url' <<<"$LIST")
[[ $LEADER != null && $REPLICA != null ]] || die "no leader or no replica in: $LIST"
log "leader $LEADER ($LEADER_API), replica $REPLICA ($REPLICA_API)"

declare -A AGENT_PID ROLE
for i in $(seq "$MEMBERS"); do
    n=node$i
    pids=$(pgrep -f "pgwarden agent -c $DIR/$n/pgwarden.toml" || true)
    [[ $(wc -w <<<"$pids") == 1 ]] || die "expected one agent process for $n, found: '$pids'"
    ppid=$(parent_pid "$pids")
    [[ $ppid == "$DEMO_PID" ]] || die "agent $n (pid $pids) is not a child of the demo (ppid $ppid)"
    AGENT_PID[$n]=$pids
    ROLE[$n]=$(jq -r --arg n "$n" '.[] | select(.name == $n) | .role' <<<"$LIST")
done

log "settling ${SETTLE_SECS}s, then measuring idle CPU over ${IDLE_SECS}s"
nap "$SETTLE_SECS"
HZ=$(getconf CLK_TCK)
declare -A T_BEFORE T_AFTER CPU_PCT RSS_MB HWM_MB RSS_AFTER_MB THREADS
# For context, also etcd, HAProxy and all processes of the directory
# (PostgreSQL included); a process that starts or ends inside the window is
# left out of the sum.
ETCD_PID=$(pgrep -P "$DEMO_PID" -f "etcd --name demo --data-dir $DIR/etcd" || true)
HAPROXY_PID=$(pgrep -P "$DEMO_PID" -f "haproxy -db -f $DIR/haproxy.cfg" || true)
declare -A ALL_BEFORE
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
OTHER_DEMOS=$(pgrep -f "pgwarden demo" | grep -vx "$DEMO_PID" | wc -l || true)
for p in $(dir_pids); do ALL_BEFORE[$p]=$(cpu_ticks "$p" 2>/dev/null || echo x); done
for n in "${!AGENT_PID[@]}"; do T_BEFORE[$n]=$(cpu_ticks "${AGENT_PID[$n]}"); done
W0=$EPOCHREALTIME
nap "$IDLE_SECS"
W1=$EPOCHREALTIME
for n in "${!AGENT_PID[@]}"; do T_AFTER[$n]=$(cpu_ticks "${AGENT_PID[$n]}"); done
ALL_TICKS=0
ETCD_TICKS=0
HAPROXY_TICKS=0
for p in "${!ALL_BEFORE[@]}"; do
    [[ ${ALL_BEFORE[$p]} == x ]] && continue
    t=$(cpu_ticks "$p" 2>/dev/null) || continue
    d=$((t - ALL_BEFORE[$p]))
    ALL_TICKS=$((ALL_TICKS + d))
    [[ $p == "$ETCD_PID" ]] && ETCD_TICKS=$d
    [[ $p == "$HAPROXY_PID" ]] && HAPROXY_TICKS=$d
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
pct() { awk -v d="$1" -v hz="$HZ" -v a="$W0" -v b="$W1" 'BEGIN { printf "%.2f", 100 * d / hz / (b - a) }'; }
ETCD_PCT=$(pct "$ETCD_TICKS")
HAPROXY_PCT=$(pct "$HAPROXY_TICKS")
ALL_PCT=$(pct "$ALL_TICKS")
log "idle window: etcd ${ETCD_PCT}%, HAProxy ${HAPROXY_PCT}%, all ${#ALL_BEFORE[@]} processes of the demo ${ALL_PCT}% of a core;" \
    "load average $LOAD_BEFORE -> $LOAD_AFTER; other pgwarden demos running: $OTHER_DEMOS"
for n in "${!AGENT_PID[@]}"; do
    p=${AGENT_PID[$n]}
    CPU_PCT[$n]=$(pct "$((T_AFTER[$n] - T_BEFORE[$n]))")
    RSS_MB[$n]=$(mb "$(status_kb "$p" VmRSS)")
    THREADS[$n]=$(status_kb "$p" Threads)
    log "$n (${ROLE[$n]}, pid $p): VmRSS ${RSS_MB[$n]} MB, idle CPU ${CPU_PCT[$n]}% of a core" \
        "($((T_AFTER[$n] - T_BEFORE[$n])) ticks at ${HZ} Hz), ${THREADS[$n]} threads"
done

# --- 3. health-check throughput ---------------------------------------------------
code=$(curl -s -o /dev/null -w '%{http_code}' "$LEADER_API/primary" 2>/dev/null || echo "?")
log "GET $LEADER_API/primary -> $code"
run_wrk P32 32 "$LEADER_API/primary"
run_wrk P4 4 "$LEADER_API/primary"
run_wrk R32 32 "$REPLICA_API/replica"

for n in "${!AGENT_PID[@]}"; do
    p=${AGENT_PID[$n]}
    RSS_AFTER_MB[$n]=$(mb "$(status_kb "$p" VmRSS)")
    HWM_MB[$n]=$(mb "$(status_kb "$p" VmHWM)")
done

# --- 4. stop ---------------------------------------------------------------------
stop_demo
if [[ -z ${LEFTOVERS// /} ]]; then
    STOP_RESULT="exited after ${STOP_SECS}s; no etcd/HAProxy/agent/PostgreSQL process of the directory left"
    STOP_VERDICT=pass
else
    STOP_RESULT="exited after ${STOP_SECS}s; **leftover pids: $LEFTOVERS**"
    STOP_VERDICT="**FAIL**"
fi

# --- 5. report ------------------------------------------------------------------
NODES=$(printf '%s\n' "${!AGENT_PID[@]}" | sort)
{
    echo
    echo "## pgwarden demo benchmark ($(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, idle window ${IDLE_SECS}s, wrk ${WRK_SECS}s)"
    echo
    echo "| Figure | Measured | Target | Result |"
    echo "|---|---|---|---|"
    echo "| Time to first write through HAProxy (demo's own report, from its start) | ${DEMO_READY_SECS} s | — (reported) | — |"
    echo "| Time to first write through HAProxy (psql from the script, from launch) | ${PSQL_READY_SECS} s | — (reported) | — |"
    for n in $NODES; do
        echo "| Agent RSS, $n (${ROLE[$n]}), after the idle window | ${RSS_MB[$n]} MB | ≤ ${TARGET_RSS_MB} MB | $(verdict "${RSS_MB[$n]}" le $TARGET_RSS_MB) |"
    done
    for n in $NODES; do
        echo "| Agent CPU while idle, $n (${ROLE[$n]}), over ${IDLE_SECS} s | ${CPU_PCT[$n]} % of a core | ≤ ${TARGET_IDLE_CPU_PCT} % | $(verdict "${CPU_PCT[$n]}" le $TARGET_IDLE_CPU_PCT) |"
    done
    echo "| etcd CPU while idle, same window | ${ETCD_PCT} % of a core | (info) | — |"
    echo "| HAProxy CPU while idle, same window | ${HAPROXY_PCT} % of a core | (info) | — |"
    echo "| All processes of the demo (agents, PostgreSQL, etcd, HAProxy) while idle | ${ALL_PCT} % of a core | (info) | — |"
    echo "| \`/primary\` on the leader, wrk -t$WRK_THREADS -c32: throughput | $(thousands "$WRK_P32_RPS") req/s | ≥ $(thousands $TARGET_PRIMARY_RPS) req/s | $(verdict "$WRK_P32_RPS" ge $TARGET_PRIMARY_RPS) |"
    echo "| \`/primary\` on the leader, wrk -t$WRK_THREADS -c32: p99 latency (p50) | ${WRK_P32_P99} ms (${WRK_P32_P50} ms) | ≤ ${TARGET_PRIMARY_P99_MS} ms | $(verdict "$WRK_P32_P99" le $TARGET_PRIMARY_P99_MS) |"
    echo "| \`/primary\` on the leader, wrk -t$WRK_THREADS -c4: throughput | $(thousands "$WRK_P4_RPS") req/s | (info) | — |"
    echo "| \`/primary\` on the leader, wrk -t$WRK_THREADS -c4: p99 latency (p50) | ${WRK_P4_P99} ms (${WRK_P4_P50} ms) | (info) | — |"
    echo "| \`/replica\` on a replica, wrk -t$WRK_THREADS -c32: throughput | $(thousands "$WRK_R32_RPS") req/s | (info) | — |"
    echo "| \`/replica\` on a replica, wrk -t$WRK_THREADS -c32: p99 latency (p50) | ${WRK_R32_P99} ms (${WRK_R32_P50} ms) | (info) | — |"
    for n in $NODES; do
        echo "| Agent RSS, $n, after the wrk runs (peak VmHWM) | ${RSS_AFTER_MB[$n]} MB (${HWM_MB[$n]} MB) | (info) | — |"
    done
    echo "| Stop: SIGTERM to the demo | $STOP_RESULT | everything stopped | $STOP_VERDICT |"
    echo
    echo "wrk non-2xx responses: /primary -c32 ${WRK_P32_NON2XX}, -c4 ${WRK_P4_NON2XX}, /replica -c32 ${WRK_R32_NON2XX};" \
        "socket errors: ${WRK_P32_ERRORS} / ${WRK_P4_ERRORS} / ${WRK_R32_ERRORS}."
    echo "Leader $LEADER, replica measured $REPLICA; ports $BASE..$((BASE + 11)) on 127.0.0.1."
    echo "Binary sha256 $BIN_SHA built from commit $GIT_REV plus $GIT_DIRTY uncommitted paths; load average at start: $LOAD_START."
    echo "Load average before/after the idle window: $LOAD_BEFORE / $LOAD_AFTER; other \`pgwarden demo\` processes on the machine: $OTHER_DEMOS."
}

FAILED=0
[[ $STOP_VERDICT == pass ]] || exit 1
