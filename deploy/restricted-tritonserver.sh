#!/bin/sh
# restricted-tritonserver.sh KEY_FILE COMMAND [ARGS...]: exec COMMAND (tritonserver and its flags)
# with Triton's restricted APIs closed to requests without the admin key read from KEY_FILE (a
# mounted Kubernetes Secret or compose secret): the gpu image's way to what serve.py gives the cpu
# image. The APIs, the header and the key's alphabet are crisis_triton/serving/server.py's
# (RESTRICTED_APIS, ADMIN_KEY_HEADER, ADMIN_KEY_PATTERN; tests/test_container_files.py checks the
# flags are restricted_args()'s). Triton takes the key only on its command line ("Limit Endpoint
# Access", docs/security.md); the key is never echoed. Exit 78 (config error) on a bad key file.
set -eu
prog=restricted-tritonserver.sh
if [ "$#" -lt 2 ]; then
    echo "$prog: usage: $prog KEY_FILE tritonserver FLAGS..." >&2
    exit 64
fi
key_file=$1
shift
if ! key=$(cat -- "$key_file" 2>/dev/null); then
    echo "$prog: cannot read the admin key file $key_file (mount the Secret there)" >&2
    exit 78
fi
case $key in
    "" | *[!A-Za-z0-9._~+-]*) valid=no ;;
    *) valid=yes ;;
esac
if [ "$valid" = no ] || [ "${#key}" -lt 16 ] || [ "${#key}" -gt 256 ]; then
    echo "$prog: $key_file: the admin key must be 16 to 256 characters of A-Z a-z 0-9 . _ ~ + -" >&2
    exit 78
fi
group="model-repository,shared-memory,logging,trace:admin-key=$key"
exec "$@" "--http-restricted-api=$group" "--grpc-restricted-protocol=$group"
