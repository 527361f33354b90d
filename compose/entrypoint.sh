#!/bin/sh
# quelay-entrypoint: create this agent's identity on first start, publish its
# fingerprint and certificate on the shared exchange volume, wait for the
# peer's, then run the agent pinned to it.
#
#   QUELAY_SITE         this agent's name (also its file name on the exchange)
#   QUELAY_PEER_SITE    the other agent's name
#   QUELAY_EXCHANGE     shared directory (default /exchange)
#   QUELAY_EXCHANGE_WAIT  seconds to wait for the peer's identity (default 600)
#
# Every other setting comes from QUELAY_* variables or QUELAY_CONFIG (see
# `quelay config keys`); extra arguments are passed to `quelay run`.
#
# The exchange volume is a convenience for this demonstration: between real
# sites, exchange fingerprints out of band (`quelay identity`) and set
# QUELAY_TRUST, or pass --trust.
#
# With a first argument that is another quelay command, the script just runs
# it: `docker run --rm quelay:local config keys`. (Client commands belong in
# `docker compose exec site-a quelay ...`, next to the agent's socket.)
set -eu
# While waiting for the peer (before `exec`), the shell is PID 1: stop on request.
trap 'exit 143' TERM
trap 'exit 130' INT

case "${1:-}" in
    run|"") ;;
    -*) ;;
    *) exec quelay "$@" ;;
esac
[ "${1:-}" = run ] && shift

site="${QUELAY_SITE:?set QUELAY_SITE to this agent's name}"
peer="${QUELAY_PEER_SITE:?set QUELAY_PEER_SITE to the other agent's name}"
exchange="${QUELAY_EXCHANGE:-/exchange}"
state="${QUELAY_STATE_DIR:-/var/lib/quelay}"
wait_max="${QUELAY_EXCHANGE_WAIT:-600}"

fingerprint="$(quelay identity --state-dir "$state")"
echo "quelay-entrypoint: $site identity $fingerprint" >&2

# Publish atomically (write, then rename), so the peer never reads half a file.
cp "$state/identity.crt" "$exchange/.$site.crt.tmp"
mv "$exchange/.$site.crt.tmp" "$exchange/$site.crt"
printf '%s\n' "$fingerprint" > "$exchange/.$site.fingerprint.tmp"
mv "$exchange/.$site.fingerprint.tmp" "$exchange/$site.fingerprint"

waited=0
while [ ! -s "$exchange/$peer.fingerprint" ]; do
    if [ "$waited" -ge "$wait_max" ]; then
        echo "quelay-entrypoint: no identity from $peer in $exchange after ${wait_max}s" >&2
        exit 1
    fi
    [ "$waited" -eq 0 ] && echo "quelay-entrypoint: waiting for $peer's identity in $exchange" >&2
    sleep 1
    waited=$((waited + 1))
done
peer_fingerprint="$(cat "$exchange/$peer.fingerprint")"
echo "quelay-entrypoint: trusting $peer $peer_fingerprint" >&2

exec quelay run --name "$site" --trust "$peer_fingerprint" "$@"
