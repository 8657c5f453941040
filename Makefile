# The two commands of the README: `make demo` (set up + run the federated demo) and `make test`.
PYTHON ?= python3.11
VENV := .venv
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1

.PHONY: setup system-tools demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: setup
	$(VENV)/bin/fedct demo --out runs/demo

# Headless Chromium + chromedriver (the review page's browser test), dicom3tools (DICOM result validation),
# Orthanc with its DICOMweb plugin (a real PACS for the pull/push tests) and nginx (the server's hospital-facing
# proxy: `fedct server start` and the deployment tests need it), installed with apt when missing and allowed
# (root, as in CI); otherwise those tests skip or fail and say why.
system-tools:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null || ! command -v dciodvfy >/dev/null \
	    || ! command -v Orthanc >/dev/null || [ ! -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] \
	    || ! { command -v nginx >/dev/null || [ -x /usr/sbin/nginx ]; }; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver dicom3tools \
	      orthanc orthanc-dicomweb nginx >/dev/null; \
	  else echo "note: chromium/chromedriver/dciodvfy/Orthanc/nginx missing and no root apt-get: browser, dciodvfy and PACS tests will skip, server tests fail"; fi; \
	fi

test: setup system-tools
	$(VENV)/bin/python -m pytest

clean:
	rm -rf runs .pytest_cache
