#!/usr/bin/env bash
# Installs the real peers the tests run against: mosquitto (the cloud broker, reference clients
# and mosquitto_passwd), nats-server (an MQTT 3.1.1-only upstream), openssl and libcoap's
# coap-client-notls from apt, paho-mqtt, cbor2 and aiocoap from PyPI.
# Idempotent: skips what is already there.
set -euo pipefail

need_apt=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
command -v mosquitto_pub >/dev/null 2>&1 || need_apt+=(mosquitto-clients)
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
command -v coap-client-notls >/dev/null 2>&1 || need_apt+=(libcoap3-bin)
# The TLS scenarios make their CA and certificates with the openssl command.
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
# The protocol fallback scenario's upstream: NATS's MQTT listener speaks 3.1.1 only.
command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ] || need_apt+=(nats-server)
# The clock-jump scenario moves the gateway's wall clock with libfaketime (LD_PRELOAD).
[ -e /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 ] || need_apt+=(faketime)
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi

if ! python3 -c 'import paho.mqtt, sys; sys.exit(0 if paho.mqtt.__version__.startswith("2") else 1)' 2>/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check 'paho-mqtt>=2,<3'
fi

# aiocoap's link-format parser (aiocoap.util.linkformat) needs LinkHeader.
if ! python3 -c 'import aiocoap, link_header' 2>/dev/null || ! command -v aiocoap-client >/dev/null 2>&1; then
  python3 -m pip install --quiet --disable-pip-version-check 'aiocoap>=0.4.7,<0.5' 'LinkHeader>=0.4,<0.5'
fi

# The health scenarios parse /metrics with prometheus-client's own parser (tests/py/health_metrics.py).
if ! python3 -c 'import prometheus_client.parser' 2>/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check 'prometheus-client>=0.17,<1'
fi

# The mDNS discovery scenarios use python-zeroconf as the peer (inside network namespaces).
if ! python3 -c 'import zeroconf' 2>/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check 'zeroconf>=0.130,<1'
fi

# The envelope scenarios decode the gateway's CBOR envelope as a cloud consumer would, with cbor2.
if ! python3 -c 'import cbor2' 2>/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check 'cbor2>=5.4,<6'
fi
