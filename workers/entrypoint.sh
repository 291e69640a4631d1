#!/bin/sh
# Entry point of the zroact worker images (workers/*/Dockerfile).
#
#   (no arguments) or options only   start this image's worker: zroact worker "$WORKER_ROLE" ...
#                                    e.g. `-c 2 -l DEBUG`; the node name is ROLE@<container hostname>,
#                                    so replicas (`--scale stage1=4`) get distinct Celery names
#   health                           exit 0 if this container's worker answers a Celery ping
#   anything else                    run it as given (zroact submit ..., celery inspect ..., sh)
#
# WORKER_UNIQUE_NAME=true: the node name is ROLE@<hostname>-<8 random hex digits>, new at each
# start, for replicas that share one hostname (network_mode: host). It is kept in
# /tmp/zroact-node-name (WORKER_NAME_FILE), where `health` finds it.
set -eu

role="${WORKER_ROLE:-}"
name_file="${WORKER_NAME_FILE:-/tmp/zroact-node-name}"

case "${1:-}" in
    "" | -*)
        if [ -z "$role" ]; then
            echo "zroact-entrypoint: WORKER_ROLE is not set (stage1, stage2 or control)" >&2
            exit 2
        fi
        name="${role}@%h"
        if [ "${WORKER_UNIQUE_NAME:-}" = true ]; then
            name="${role}@$(hostname)-$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')"
            printf '%s\n' "$name" >"$name_file"
        fi
        exec zroact worker "$role" --name "$name" "$@"
        ;;
    health)
        # %h in the node name above is Celery's expansion of the hostname: the same as here.
        node="${role}@$(hostname)"
        if [ "${WORKER_UNIQUE_NAME:-}" = true ]; then
            node="$(cat "$name_file")"
        fi
        exec celery -A zroact_tasks.app inspect ping \
            --destination "$node" --timeout "${HEALTH_TIMEOUT_S:-10}" >/dev/null
        ;;
    *)
        exec "$@"
        ;;
esac
