#!/bin/sh
# Site entrypoint: the same script runs in the container and in the test suite (tests/test_deployment.py).
# Validates the env file, checks TLS, ingests the DICOM folder, then runs the Flower SuperNode in the foreground
# and, with FEDCT_CLIENTAPP_RUNNER=warm (the default), fedct's warm ClientApp executor next to it (both stop with
# this process: `exec` makes `fedct site` the process that receives the container's SIGTERM).
# FEDCT_ENV: the site's env file (default /config/site.env). Extra arguments go to `fedct site`.
set -eu
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
exec "${FEDCT:-fedct}" site --env "${FEDCT_ENV:-/config/site.env}" "$@"
