#!/bin/sh
# Server entrypoint: the same script runs in the container and in the test suite (tests/test_deployment.py).
# Validates the env file, starts the SuperLink on 127.0.0.1 (TLS, SuperNode authentication, SuperExec secret,
# database on disk, no runtime dependency installation) and its SuperExec, registers the sites' public keys, starts
# nginx on the hospital-facing port (Fleet API only) and stays in the foreground until stopped.
# FEDCT_ENV: the server's env file (default /config/server.env). Extra arguments go to `fedct server start`.
set -eu
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
exec "${FEDCT:-fedct}" server start --env "${FEDCT_ENV:-/config/server.env}" "$@"
