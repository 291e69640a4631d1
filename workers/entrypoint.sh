#!/bin/sh
# Entry point of the zroact worker images (workers/*/Dockerfile).
#
#   (no arguments) or options only   start this image's worker: zroact worker "$WORKER_ROLE" ...
#                                    e.g. `-c 2 -l DEBUG`; the node name is ROLE@<container hostname>,
#                                    so replicas (`--scale stage1=4`) get distinct Celery names
#   health                           exit 0 if this container's worker answers a Celery ping
#   anything else                    run it as given (zroact submit ..., celery inspect ..., sh)
set -eu

role="${WORKER_ROLE:-}"

case "${1:-}" in
    "" | -*)
        if [ -z "$role" ]; then
            echo "zroact-entrypoint: WORKER_ROLE is not set (stage1, stage2 or control)" >&2
            exit 2
        fi
        exec zroact worker "$role" --name "${role}@%h" "$@"
        ;;
    health)
        # %h in the node name above is Celery's expansion of the hostname: the same as here.
        exec celery -A zroact_tasks.app inspect ping \
            --destination "${role}@$(hostname)" --timeout "${HEALTH_TIMEOUT_S:-10}" >/dev/null
        ;;
    *)
        exec "$@"
        ;;
esac
