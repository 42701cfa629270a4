# Shared by relay.sh and storm.sh: starts the sink and an MTA under test
# (mtad, or a private Postfix instance) and tears everything down on exit.
# Expects MTA and KEEP to be set and HERE to be this directory; sets T (the
# temp dir), SINK_PID, MTA_PID, PF_CONF and installs an EXIT trap.
#
# Ports are fixed by the issue: the MTA listens on 127.0.0.1:2525, the sink
# on 127.0.0.1:2526 (BENCH_PORT / BENCH_SINK_PORT override them). Nothing
# here talks to any address outside 127.0.0.0/8.

BENCH_TMPDIR=${BENCH_TMPDIR:-/var/tmp}
KEEP=${KEEP:-0}
ROOT=$(dirname "$HERE")
MTAD_BIN=${MTAD_BIN:-$ROOT/target/release/mtad}
SMTP_SOURCE=/usr/sbin/smtp-source
SMTP_SINK=/usr/sbin/smtp-sink
HOST=127.0.0.1
# The issue fixes these; override only if something else holds them.
PORT=${BENCH_PORT:-2525}
SINK_PORT=${BENCH_SINK_PORT:-2526}
# mtad's admin API (queue.sh lists the queue through it).
ADMIN_PORT=${BENCH_ADMIN_PORT:-8025}
# REPLICAS=N above 1: mtad runs in a cluster with N-1 more nodes, each
# message copied to N-1 of them before "250" (issue 14). Their cluster
# links and SMTP listeners use ports from CLUSTER_PORT on.
REPLICAS=${REPLICAS:-1}
CLUSTER_PORT=${BENCH_CLUSTER_PORT:-2600}
HOLDER_PIDS=()
# ROUTE=mx: mtad finds the sink by the MX record of dest.example, asked
# of a Knot DNS server on 127.0.0.1:DNS_PORT (issue 15), instead of a
# static next hop; the sink then listens on 127.0.0.2, as an MX at one of
# mtad's own addresses would be a mail loop.
ROUTE=${ROUTE:-static}
DNS_PORT=${BENCH_DNS_PORT:-2653}
KNOT_PID=''
SINK_HOST=$HOST
[[ $ROUTE == mx ]] && SINK_HOST=127.0.0.2
SENDER=bench@example.test
# A domain that no MTA here considers local, so every message is relayed.
RCPT=sink@dest.example

case $MTA in mtad | postfix | postfix-tuned) ;; *)
    echo "unknown MTA '$MTA' (mtad, postfix, postfix-tuned)" >&2
    exit 2
    ;;
esac

log() { printf '[%s %s] %s\n' "$(basename "$0" .sh)" "$MTA" "$*" >&2; }
# A script error keeps the temp dir (logs, spool) for a post-mortem; a
# benchmark that merely fails its target does not.
die() { log "ERROR: $*"; KEEP=1; exit 1; }

listening() { ss -Hltn "sport = :$1" | grep -q .; }

# Wait for a TCP listener without connecting to it: a probe connection
# would show up in the sink's session counter and in the MTA's logs.
wait_listen() { # port seconds pid-that-must-stay-alive
    local i
    for ((i = 0; i < $2 * 20; i++)); do
        listening "$1" && return 0
        if [[ -n ${3:-} ]] && ! kill -0 "$3" 2>/dev/null; then return 1; fi
        sleep 0.05
    done
    return 1
}

for p in $PORT $SINK_PORT; do
    listening "$p" && die "port $p is already in use; is another benchmark or test running?"
done

T=$(mktemp -d "$BENCH_TMPDIR/mtad-bench.XXXXXX")
# The Postfix daemons run as user postfix and must reach their queue.
chmod 755 "$T"
SINK_PID='' MTA_PID='' MEM_PID='' PF_CONF=''

cleanup() {
    local rc=$?
    set +e
    [[ -n $MEM_PID ]] && kill "$MEM_PID" 2>/dev/null
    if [[ -n $PF_CONF ]]; then
        postfix -c "$PF_CONF" stop >/dev/null 2>&1
        # "postfix stop" returns before the master has exited; wait so the
        # queue directory is not removed under running daemons.
        for _ in $(seq 100); do kill -0 "$MTA_PID" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$MTA_PID" 2>/dev/null && postfix -c "$PF_CONF" abort >/dev/null 2>&1
    elif [[ -n $MTA_PID ]]; then
        for pid in "${HOLDER_PIDS[@]}"; do kill "$pid" 2>/dev/null; done
        kill "$MTA_PID" 2>/dev/null
        for _ in $(seq 100); do kill -0 "$MTA_PID" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$MTA_PID" 2>/dev/null
    fi
    [[ -n $SINK_PID ]] && kill "$SINK_PID" 2>/dev/null
    [[ -n $KNOT_PID ]] && kill "$KNOT_PID" 2>/dev/null
    wait 2>/dev/null
    if [[ $KEEP == 1 ]]; then
        log "kept $T for inspection (remove it by hand)"
    else
        rm -rf "$T"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

fstype=$(df --output=fstype "$T" | tail -1)
[[ $fstype == tmpfs || $fstype == ramfs ]] && log "WARNING: $T is on $fstype; fsync is free there, results are meaningless"

# --- the sink --------------------------------------------------------------
# -c writes a running "sess= quit= mesg=" counter to stdout; that counter is
# how we know when everything has arrived, without dumping any message to
# disk. -m: the MTAs open at most 20 (mtad) or 20 (Postfix) connections,
# but leave room. As root, smtp-sink insists on dropping privileges.
sink_user=()
[[ $(id -u) == 0 ]] && sink_user=(-u nobody)
"$SMTP_SINK" "${sink_user[@]}" -c -m 1000 "$SINK_HOST:$SINK_PORT" 4096 >"$T/sink.count" 2>"$T/sink.err" &
SINK_PID=$!
wait_listen $SINK_PORT 10 $SINK_PID || die "smtp-sink did not start: $(cat "$T/sink.err")"

# The MTAs inherit this. mtad holds one descriptor per client connection
# (10,000 in the storm) plus spool and association sockets, far above the
# usual 1024. Containers may cap the hard limit; then take what we can get.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
log "open files limit: $(ulimit -n)"

# --- the MTA ---------------------------------------------------------------
start_mtad() {
    if [[ ! -x $MTAD_BIN ]]; then
        log "building $MTAD_BIN"
        (cd "$ROOT" && cargo build --release) >&2 || die "cargo build --release failed"
    fi
    mkdir -p "$T/data"
    [[ $ROUTE == mx ]] && start_knot
    cat >"$T/mtad.toml" <<EOF
[node]
name = "bench"
data_dir = "$T/data"

[smtp]
listen = ["$HOST:$PORT"]
hostname = "mx.example.test"
max_connections = 20000

[delivery]
association_threshold = 50
max_associations = 20

$(route_config)

[admin]
listen = "$HOST:$ADMIN_PORT"

[log]
format = "json"
level = "warn"
EOF
    if ((REPLICAS > 1)); then
        cluster_config "$CLUSTER_PORT" '' >>"$T/mtad.toml"
    fi
    "$MTAD_BIN" run --config "$T/mtad.toml" >"$T/mtad.log" 2>&1 &
    MTA_PID=$!
    wait_listen $PORT 30 $MTA_PID || die "mtad did not listen on $PORT: $(tail -5 "$T/mtad.log")"
    local i up=0
    for ((i = 1; i < REPLICAS; i++)); do
        local dir=$T/holder$i cfg=$T/holder$i.toml
        mkdir -p "$dir"
        printf '[node]\nname = "holder%s"\ndata_dir = "%s"\n\n[smtp]\nlisten = ["%s:%s"]\n\n[[route]]\ndomains = ["*"]\nnext_hops = ["%s:%s"]\ntls = "none"\n\n[log]\nformat = "json"\nlevel = "warn"\n' \
            "$i" "$dir" "$HOST" $((CLUSTER_PORT + 50 + i)) "$SINK_HOST" "$SINK_PORT" >"$cfg"
        cluster_config $((CLUSTER_PORT + i)) "\"$HOST:$CLUSTER_PORT\"" >>"$cfg"
        "$MTAD_BIN" run --config "$cfg" >"$T/holder$i.log" 2>&1 &
        HOLDER_PIDS+=($!)
    done
    if ((REPLICAS > 1)); then
        # Every member up as the accepting node sees it, or copies fail.
        for ((i = 0; i < 600; i++)); do
            up=$("$MTAD_BIN" ctl --admin "http://$HOST:$ADMIN_PORT" nodes 2>/dev/null | grep -c ' up ' || true)
            ((up == REPLICAS)) && break
            sleep 0.05
        done
        ((up == REPLICAS)) || die "the cluster did not form: $(tail -5 "$T/mtad.log")"
        log "cluster of $REPLICAS up: replicas = $REPLICAS"
    fi
}

# The benchmark's [[route]] (and [dns]) as ROUTE says.
route_config() {
    if [[ $ROUTE != mx ]]; then
        printf '[[route]]\ndomains = ["*"]\nnext_hops = ["%s:%s"]\ntls = "none"\n' "$SINK_HOST" "$SINK_PORT"
        return
    fi
    printf '[[route]]\ndomains = ["*"]\nmx = true\nmx_port = %s\ntls = "none"\n\n[dns]\nservers = ["%s:%s"]\n' \
        "$SINK_PORT" "$HOST" "$DNS_PORT"
}

# Knot serving dest.example: MX 10 sink.dest.example, at SINK_HOST; its
# query counters (mod-stats) say how many lookups the run cost.
start_knot() {
    mkdir -p "$T/knot"
    cat >"$T/knot/knot.conf" <<KNOT
server:
    listen: $HOST@$DNS_PORT
    rundir: $T/knot
database:
    storage: $T/knot/db
mod-stats:
  - id: default
template:
  - id: default
    storage: $T/knot
    file: "%s.zone"
    module: mod-stats/default
zone:
  - domain: dest.example
KNOT
    printf '$ORIGIN dest.example.\n$TTL 300\n@ SOA ns hostmaster 1 3600 600 86400 60\n@ NS ns\nns A %s\n@ MX 10 sink\nsink A %s\n' \
        "$HOST" "$SINK_HOST" >"$T/knot/dest.example.zone"
    knotd -c "$T/knot/knot.conf" 2>"$T/knot/knotd.log" >&2 &
    KNOT_PID=$!
    for _ in $(seq 100); do knotc -c "$T/knot/knot.conf" status >/dev/null 2>&1 && return 0; sleep 0.05; done
    die "knotd did not start: $(cat "$T/knot/knotd.log")"
}

# DNS queries Knot answered so far (0 without ROUTE=mx).
dns_queries() {
    [[ -n $KNOT_PID ]] || { echo 0; return; }
    knotc -c "$T/knot/knot.conf" zone-stats dest.example mod-stats 2>/dev/null |
        awk -F'= ' '/request-protocol/ {n += $2} END {print n + 0}'
}

# The [spool] and [cluster] tables of a benchmark cluster node.
cluster_config() { # cluster-port seeds
    [[ -s $T/cluster.key ]] || { echo "benchmark cluster secret, long enough" >"$T/cluster.key"; chmod 600 "$T/cluster.key"; }
    printf '\n[spool]\nreplicas = %s\n\n[cluster]\nname = "bench"\nlisten = "%s:%s"\nseeds = [%s]\nsecret_file = "%s"\n' \
        "$REPLICAS" "$HOST" "$1" "$2" "$T/cluster.key"
}

start_postfix() {
    local tuned=$1 pf=$T/postfix
    PF_CONF=$pf/etc
    mkdir -p "$PF_CONF" "$pf/spool" "$pf/lib"
    chown postfix "$pf/lib" # master.lock and caches are written as postfix
    # A private instance: its own config, queue and data directories, so a
    # system Postfix (if any) is neither read nor disturbed. Only what the
    # benchmark needs differs from the compiled-in defaults: listen on
    # 127.0.0.1:2525, relay everything to the sink, no local delivery.
    # Fsync behaviour is Postfix's default (cleanup fsyncs each queue file
    # before smtpd answers 250).
    cat >"$PF_CONF/main.cf" <<EOF
compatibility_level = 3.6
queue_directory = $pf/spool
data_directory = $pf/lib
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix-bench.example.test
mydomain = example.test
myorigin = \$myhostname
inet_interfaces = $HOST
inet_protocols = ipv4
mydestination =
local_recipient_maps =
local_transport = error:5.1.1 local delivery is disabled
alias_maps =
alias_database =
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
relayhost = [$HOST]:$SINK_PORT
# No syslog daemon is assumed; postlogd writes the log (as a real
# deployment would log somewhere, this cost belongs in the measurement).
maillog_file = $pf/maillog
biff = no
EOF
    if [[ $tuned == 1 ]]; then
        # Common production tuning, in the spirit of the issue's "raising
        # default_process_limit". Default Postfix already allows 100 smtpd
        # and 20 parallel deliveries to one destination, so these matter
        # less for concurrency than for flow control:
        # - in_flow_delay (default 1s) makes smtpd stall a client for up to
        #   a second per message whenever the queue grows faster than it
        #   drains. That is deliberate back-pressure; mtad has none, so the
        #   tuned run shows Postfix without it.
        # - default_process_limit 100 -> 200 and initial destination
        #   concurrency 5 -> 20 (mtad's max_associations), so neither
        #   process slots nor the slow-start ramp cap the run.
        cat >>"$PF_CONF/main.cf" <<EOF
default_process_limit = 200
in_flow_delay = 0s
initial_destination_concurrency = 20
EOF
    fi
    # Debian's master.cf chroots most daemons, which needs copies of /etc
    # files inside the queue directory; without chroot nothing else changes.
    # The smtpd service is named by port so it listens on $PORT, not 25.
    cat >"$PF_CONF/master.cf" <<EOF
$PORT      inet  n       -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
EOF
    # Creates the queue subdirectories with Postfix's ownership.
    postfix -c "$PF_CONF" check >"$T/postfix-check.log" 2>&1 ||
        die "postfix check failed: $(cat "$T/postfix-check.log")"
    postfix -c "$PF_CONF" start >"$T/postfix-start.log" 2>&1 ||
        die "postfix start failed: $(cat "$T/postfix-start.log")"
    local i
    for ((i = 0; i < 100; i++)); do
        [[ -s $pf/spool/pid/master.pid ]] && break
        sleep 0.1
    done
    MTA_PID=$(tr -d ' \n' <"$pf/spool/pid/master.pid")
    wait_listen $PORT 30 "$MTA_PID" || die "postfix did not listen on $PORT: $(tail -5 "$pf/maillog" 2>/dev/null)"
}

case $MTA in
mtad) start_mtad ;;
postfix) start_postfix 0 ;;
postfix-tuned) start_postfix 1 ;;
esac
log "$MTA is up (pid $MTA_PID); load: $(cut -d' ' -f1-3 /proc/loadavg)"

