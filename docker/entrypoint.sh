#!/bin/sh
# The API key reaches the container as a docker secret (a file under /run/secrets), never as image
# config or a visible env value. align-serve and align-train read it from ALIGN_API_KEY, so export
# it from ALIGN_API_KEY_FILE before handing over to the command.
set -eu
if [ -z "${ALIGN_API_KEY:-}" ] && [ -n "${ALIGN_API_KEY_FILE:-}" ]; then
    if [ ! -r "$ALIGN_API_KEY_FILE" ]; then
        echo "entrypoint: ALIGN_API_KEY_FILE=$ALIGN_API_KEY_FILE is not a readable file; create the secret" \
             "(see the README's Deployment section) or unset ALIGN_API_KEY_FILE to run without a key" >&2
        exit 64
    fi
    ALIGN_API_KEY="$(cat "$ALIGN_API_KEY_FILE")"
    export ALIGN_API_KEY
fi
exec "$@"
