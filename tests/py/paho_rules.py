#!/usr/bin/env python3
"""Broker rules checked with a third-party client: paho-mqtt 2.x, MQTT 5 and 3.1.1.

    paho_rules.py RULE --port PORT [--health-port P] [--anon-port P] [--user NAME:PASSWORD]...
                  [--tls-port P] [--tls-client-port P] [--tls-required-port P] [--certs DIR]

RULE is one of the functions registered with @rule below; each is named as the Rust test that
runs it (tests/tests/paho_*.rs) and checks one rule against a running outpost on 127.0.0.1.
Every check that holds prints `ok <what>`; the first that does not raises `Failure`, printed as
`FAIL <rule>: <expected vs observed>` (exit 1). A rule that passes ends with `PASS <rule>`.
Some rules print `counters {json}` before that: by how much they expect the gateway's
`outpost_broker_<name>_total` counters to have moved (the Rust test checks /metrics).
A rule that needs the test to act (stop the gateway) prints `await <what>` and waits.

Waits are deadlines for events (CONNACK, SUBACK, a message, a DISCONNECT), never measurements;
that something did *not* arrive is shown by a later message that must come after it in the same
session (a sentinel), except where the rule itself is about time passing.
"""
import argparse
import json
import os
import socket
import ssl
import sys
import threading
import time
import urllib.request

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

# Deadline for anything that must happen: generous, the CI machines are small and shared.
TIMEOUT = 30.0
HOST = "127.0.0.1"

# MQTT 5 reason codes the rules look for.
SUCCESS = 0x00
NO_SUBSCRIPTION_EXISTED = 0x11
UNSPECIFIED_ERROR = 0x80
PROTOCOL_ERROR = 0x82
SERVER_SHUTTING_DOWN = 0x8B
KEEP_ALIVE_TIMEOUT = 0x8D
SESSION_TAKEN_OVER = 0x8E
TOPIC_FILTER_INVALID = 0x8F
BAD_USERNAME_OR_PASSWORD = 0x86
NOT_AUTHORIZED = 0x87
TOPIC_ALIAS_INVALID = 0x94
PACKET_TOO_LARGE = 0x95
PAYLOAD_FORMAT_INVALID = 0x99

OPTS = argparse.Namespace()


class Failure(Exception):
    """A rule did not hold: the message says what was expected and what was observed."""


def check(cond, what):
    """Raises Failure(what) unless cond; prints `ok what` otherwise."""
    if not cond:
        raise Failure(what)
    print(f"ok {what}", flush=True)


def check_eq(observed, expected, what):
    if observed != expected:
        raise Failure(f"{what}: expected {expected!r}, observed {observed!r}")
    print(f"ok {what}: {observed!r}", flush=True)


def props(packet_type, **values):
    """A paho Properties of `packet_type` with the given properties set."""
    p = Properties(packet_type)
    for name, value in values.items():
        setattr(p, name, value)
    return p


def prop(message_or_props, name, default=None):
    """Property `name` of a received message (or a Properties), `default` when absent."""
    p = message_or_props
    if not isinstance(p, Properties):
        p = getattr(p, "properties", None)  # an MQTTMessage (None for 3.1.1)
    return getattr(p, name, default) if p is not None else default


def code(rc):
    """A paho ReasonCode (or int) as an int."""
    return rc if isinstance(rc, int) else rc.value


def metric(name):
    """The value of sample `name` on the gateway's /metrics (needs --health-port)."""
    url = f"http://{HOST}:{OPTS.health_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == name:
            return float(parts[1])
    raise Failure(f"no sample {name} in /metrics")


def wait_until(what, probe, timeout=TIMEOUT, period=0.05):
    """Polls `probe` until it returns something other than None; fails after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        v = probe()
        if v is not None:
            return v
        if time.monotonic() > deadline:
            raise Failure(f"timed out after {timeout}s waiting for {what}")
        time.sleep(period)


def wait_metric_above(name, floor, what):
    """Waits until /metrics sample `name` exceeds `floor`; returns the value."""
    def probe():
        v = metric(name)
        return v if v > floor else None

    return wait_until(what, probe, period=0.1)


class Conn:
    """One paho connection (no automatic reconnect) with its events recorded for waiting.

    The network loop runs in a thread of ours calling `client.loop()`, so a lost connection
    stays lost (paho's own loop thread would reconnect) and the loop can be paused.
    """

    def __init__(self, name, client_id="", v5=True, port=None, clean=True, session_expiry=None,
                 receive_maximum=None, maximum_packet_size=None, will=None, username=None,
                 password=None, tls=None, manual_ack=False, keepalive=30):
        self.name = name
        self.v5 = v5
        self.port = port or OPTS.port
        self.keepalive = keepalive
        self.clean = clean
        kw = {} if v5 else {"clean_session": clean}
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
                                  manual_ack=manual_ack, **kw)
        self.connect_props = None
        if v5:
            values = {}
            if session_expiry is not None:
                values["SessionExpiryInterval"] = session_expiry
            if receive_maximum is not None:
                values["ReceiveMaximum"] = receive_maximum
            if maximum_packet_size is not None:
                values["MaximumPacketSize"] = maximum_packet_size
            self.connect_props = props(PacketTypes.CONNECT, **values)
        if will is not None:
            self.client.will_set(**will)
        if username is not None:
            self.client.username_pw_set(username, password)
        if tls is not None:
            self.client.tls_set(**tls)
        self.cond = threading.Condition()
        self.connack = None        # (reason code, session_present, properties)
        self.disconnect = None     # (reason code, from_server)
        self.acks = {}             # mid -> reason code of PUBACK / PUBCOMP (or QoS 0 sent)
        self.subacks = {}          # mid -> [reason codes]
        self.unsubacks = {}        # mid -> [reason codes]
        self.messages = []         # MQTTMessage, in arrival order
        self.cursor = 0            # next message `until()` looks at
        self.ack_on_arrival = False  # with manual_ack: ack each message as it arrives from now
        self.thread = None
        self.stopping = threading.Event()
        c = self.client
        # Only our loop thread writes to the socket. Without a loop thread of its own, paho
        # writes from whichever thread calls publish() or ack(), and two writers can interleave
        # the pieces of partially sent packets.
        c.on_socket_register_write = lambda client, userdata, sock: None
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        c.on_unsubscribe = self._on_unsubscribe
        c.on_message = self._on_message

    # -- callbacks (loop thread) --
    def _record(self, f):
        with self.cond:
            f()
            self.cond.notify_all()

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        ack = (reason_code, flags.session_present, properties)
        self._record(lambda: setattr(self, "connack", ack))

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        end = (reason_code, flags.is_disconnect_packet_from_server)
        self._record(lambda: setattr(self, "disconnect", end))

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        self._record(lambda: self.acks.__setitem__(mid, reason_code))

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        self._record(lambda: self.subacks.__setitem__(mid, list(reason_codes)))

    def _on_unsubscribe(self, client, userdata, mid, reason_codes, properties):
        self._record(lambda: self.unsubacks.__setitem__(mid, list(reason_codes)))

    def _on_message(self, client, userdata, msg):
        self._record(lambda: self.messages.append(msg))
        if self.ack_on_arrival:
            client.ack(msg.mid, msg.qos)

    # -- waiting --
    def wait(self, what, probe, timeout=TIMEOUT):
        """Waits until probe() (called under the lock) returns something other than None."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                v = probe()
                if v is not None:
                    return v
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Failure(f"{self.name}: timed out after {timeout}s waiting for {what}; "
                                  f"received so far: {self.payloads()}")
                self.cond.wait(left)

    # -- the loop --
    def _run(self):
        while not self.stopping.is_set():
            try:
                if self.client.loop(timeout=0.05) != mqtt.MQTT_ERR_SUCCESS:
                    break
            except (ssl.SSLError, OSError) as e:
                # A TLS alert after the handshake (TLS 1.3 client certificate checks) is
                # raised from the read rather than reported as a lost connection.
                end = (f"{type(e).__name__}: {e}", False)
                self._record(lambda: setattr(self, "disconnect", end))
                break

    def start_loop(self):
        self.stopping.clear()
        self.thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self.thread.start()

    def pause_loop(self):
        """Stops reading and writing (no PINGREQ either) until start_loop()."""
        self.stopping.set()
        if self.thread is not None:
            self.thread.join()

    # -- connection --
    def open(self):
        """Sends CONNECT; returns (reason code, session_present, properties), or None when the
        connection ended without a CONNACK. Raises what the socket or TLS handshake raised."""
        kw = {"clean_start": self.clean, "properties": self.connect_props} if self.v5 else {}
        self.client.connect(HOST, self.port, keepalive=self.keepalive, **kw)
        self.start_loop()
        self.wait("CONNACK", lambda: True if self.connack or self.disconnect else None)
        return self.connack

    def close(self):
        """A clean DISCONNECT (the will is discarded); waits for the end of the connection."""
        self.client.disconnect()
        self.wait("the end of the connection", lambda: self.disconnect)
        self.pause_loop()

    def drop(self):
        """Ends the connection without DISCONNECT, as a crash or a pulled cable would."""
        self.pause_loop()
        sock = self.client.socket()
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def wait_disconnect(self, timeout=TIMEOUT):
        """(reason code as int, sent by the server) once the connection has ended."""
        rc, from_server = self.wait("the connection to end", lambda: self.disconnect, timeout)
        return (rc if isinstance(rc, str) else code(rc)), from_server

    # -- packets --
    def publish(self, topic, payload, qos=1, retain=False, properties=None, wait=True):
        """Publishes; for QoS 1/2 waits for the PUBACK/PUBCOMP and returns its reason code."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if not wait:
            return None  # (a publish the broker closes the connection for may end it mid-write)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise Failure(f"{self.name}: publish to {topic!r} not sent: "
                          f"{mqtt.error_string(info.rc)}")
        ack = self.wait(f"the ack of {topic!r} (mid {info.mid})", lambda: self.acks.get(info.mid))
        return code(ack)

    def subscribe(self, subs, properties=None):
        """subs: [(filter, qos or SubscribeOptions)]; returns the SUBACK's codes as ints."""
        rc, mid = self.client.subscribe(subs, properties=properties)
        if rc != mqtt.MQTT_ERR_SUCCESS:
            raise Failure(f"{self.name}: SUBSCRIBE {subs} not sent: {mqtt.error_string(rc)}")
        return [code(c) for c in self.wait(f"SUBACK for {subs}", lambda: self.subacks.get(mid))]

    def unsubscribe(self, filters):
        rc, mid = self.client.unsubscribe(filters)
        if rc != mqtt.MQTT_ERR_SUCCESS:
            raise Failure(f"{self.name}: UNSUBSCRIBE {filters} not sent: {mqtt.error_string(rc)}")
        codes = self.wait(f"UNSUBACK for {filters}", lambda: self.unsubacks.get(mid))
        return [code(c) for c in codes]

    # -- messages --
    def payloads(self):
        return [m.payload.decode(errors="replace") for m in self.messages]

    def until(self, payload, timeout=TIMEOUT):
        """The messages from the cursor up to and including the first with `payload` (moving
        the cursor past it)."""
        want = payload.encode() if isinstance(payload, str) else payload

        def probe():
            for i in range(self.cursor, len(self.messages)):
                if self.messages[i].payload == want:
                    return i
            return None

        i = self.wait(f"message {payload!r}", probe, timeout)
        got = self.messages[self.cursor:i + 1]
        self.cursor = i + 1
        return got

    def expect_set(self, expected, what):
        """Waits until every payload of `expected` has arrived (in any order: MQTT orders
        messages per QoS level only); returns them as {payload: message}, checking that nothing
        else and no payload twice arrived meanwhile."""
        want = sorted(expected)
        self.wait(f"messages {want}", lambda: True if set(want) <= set(self.payloads()) else None)
        check_eq(sorted(self.payloads()[self.cursor:]), want, what)
        got = {m.payload.decode(errors="replace"): m for m in self.messages[self.cursor:]}
        self.cursor = len(self.messages)
        return got

    def expect_sequence(self, expected, what):
        """Checks that the next messages' payloads are exactly `expected` (waiting for the last)."""
        got = self.until(expected[-1])
        check_eq([m.payload.decode(errors="replace") for m in got], list(expected), what)
        return got


def connect(name, expect_present=None, **kw):
    """A connected Conn (CONNACK success required; session_present checked if given)."""
    c = Conn(name, **kw)
    ack = c.open()
    if ack is None or code(ack[0]) != SUCCESS:
        raise Failure(f"{name}: CONNECT refused: {None if ack is None else ack[0]}, "
                      f"disconnect {c.disconnect}")
    if expect_present is not None:
        check_eq(bool(ack[1]), expect_present, f"{name}: CONNACK session present")
    return c


def refused_connect(name, **kw):
    """Connects expecting a refusal; returns the CONNACK reason as an int (None: no CONNACK)."""
    c = Conn(name, **kw)
    try:
        ack = c.open()
    except (ssl.SSLError, OSError) as e:
        print(f"{name}: connect raised {type(e).__name__}: {e}", flush=True)
        return None
    c.wait("the connection to end after the refusal", lambda: c.disconnect)
    c.pause_loop()
    if ack is None:
        print(f"{name}: connection ended without CONNACK: {c.disconnect[0]}", flush=True)
        return None
    if code(ack[0]) == SUCCESS:
        raise Failure(f"{name}: CONNECT was accepted, a refusal was expected")
    return code(ack[0])


def opts(qos=1, **kw):
    return SubscribeOptions(qos=qos, **kw)


RULES = {}


def rule(f):
    RULES[f.__name__] = f
    return f


def counters(**expected):
    print("counters " + json.dumps(expected), flush=True)


# =============================================================================================
# MQTT 5: reason codes
# =============================================================================================

@rule
def mqtt5_acks_carry_reason_codes():
    """PUBACK/PUBCOMP 0x00 when stored, PUBACK 0x99 when the route's payload format does not
    decode (route `acks/json/#` is format json); SUBACK the granted QoS per filter and 0x8F
    for a malformed shared subscription; UNSUBACK 0x00, or 0x11 with no such subscription."""
    c = connect("acks")
    check_eq(c.publish("acks/plain", b"x", qos=1), SUCCESS, "PUBACK reason for a stored QoS 1")
    check_eq(c.publish("acks/plain", b"x", qos=2), SUCCESS, "PUBCOMP reason for a stored QoS 2")
    check_eq(c.publish("acks/json/t", b'{"t": 21.5}', qos=1), SUCCESS,
             "PUBACK reason for valid JSON on a json route")
    check_eq(c.publish("acks/json/t", b"not json {", qos=1), PAYLOAD_FORMAT_INVALID,
             "PUBACK reason for invalid JSON on a json route (0x99 payload format invalid)")
    granted = c.subscribe([("acks/q0", 0), ("acks/q1", 1), ("acks/q2", 2), ("$share/nofilter", 1)])
    check_eq(granted, [0, 1, 2, TOPIC_FILTER_INVALID],
             "SUBACK codes: granted QoS 0, 1, 2, then 0x8F for $share/<group> without a filter")
    check_eq(c.unsubscribe(["acks/q1", "acks/never"]), [SUCCESS, NO_SUBSCRIPTION_EXISTED],
             "UNSUBACK codes: 0x00 for a subscription, 0x11 for none")
    c.close()


def alias_violation(name, alias, topic):
    """Publishes with a topic alias the broker must not accept; returns the DISCONNECT."""
    c = connect(name)
    p = Properties(PacketTypes.PUBLISH)
    # paho refuses to encode alias 0 itself; the broker must cope with clients that do not.
    object.__setattr__(p, "TopicAlias", alias)
    c.publish(topic, b"x", qos=0, properties=p, wait=False)
    return c.wait_disconnect()


@rule
def mqtt5_server_disconnect_carries_reason_code():
    """The broker's DISCONNECT says why: 0x8E session taken over, 0x94 topic alias 0 or above the
    CONNACK's maximum, 0x82 an alias never set, 0x8D keep-alive timeout, 0x8B shutdown (the test
    stops the gateway when this rule says `await shutdown`)."""
    first = connect("takeover-1", client_id="dup")
    connect("takeover-2", client_id="dup")
    check_eq(first.wait_disconnect(), (SESSION_TAKEN_OVER, True),
             "DISCONNECT (reason, from server) to a client whose id connects again")

    alias_max = prop(connect("alias-max").connack[2], "TopicAliasMaximum", 0)
    check(alias_max >= 1, f"CONNACK announces a topic alias maximum ({alias_max})")
    check_eq(alias_violation("alias-0", 0, "alias/zero"), (TOPIC_ALIAS_INVALID, True),
             "DISCONNECT for topic alias 0")
    check_eq(alias_violation("alias-over", alias_max + 1, "alias/over"),
             (TOPIC_ALIAS_INVALID, True), "DISCONNECT for a topic alias above the maximum")
    check_eq(alias_violation("alias-unset", 1, ""), (PROTOCOL_ERROR, True),
             "DISCONNECT for an empty topic with an alias never set")

    # Keep-alive 1 s: the broker gives up after 1.5 s of silence. The loop is paused (no
    # PINGREQ) until the broker has counted the timeout, then the DISCONNECT is read.
    timeouts = metric("outpost_broker_keepalive_timeouts_total")
    quiet = connect("silent", keepalive=1)
    quiet.pause_loop()
    wait_metric_above("outpost_broker_keepalive_timeouts_total", timeouts, "the keep-alive timeout")
    quiet.start_loop()
    check_eq(quiet.wait_disconnect(), (KEEP_ALIVE_TIMEOUT, True),
             "DISCONNECT to a client silent for 1.5 x its keep-alive")

    waiting = connect("shutdown")
    print("await shutdown", flush=True)
    check_eq(waiting.wait_disconnect(timeout=60), (SERVER_SHUTTING_DOWN, True),
             "DISCONNECT to connected clients when the gateway stops")


# =============================================================================================
# MQTT 5: sessions, expiry, wills
# =============================================================================================

@rule
def mqtt5_session_kept_for_expiry_interval_then_discarded():
    """A session with expiry 3 s survives a disconnect (session present, subscription kept, QoS 1
    queued while away), is discarded once the interval passed (not before), and expiry 0 or a
    DISCONNECT setting 0 keeps nothing. CONNACK's session-present flag says which."""
    interval = 3
    sub = connect("se", client_id="se", session_expiry=interval, expect_present=False)
    check_eq(sub.subscribe([("se/t", 1)]), [1], "SUBACK")
    sub.close()
    pub = connect("se-pub")
    pub.publish("se/t", b"while-away")
    # Reconnect well inside the interval.
    sub = connect("se-back", client_id="se", clean=False, session_expiry=interval,
                  expect_present=True)
    sub.expect_sequence(["while-away"], "QoS 1 queued while the session was offline")

    expired_before = metric("outpost_broker_sessions_expired_total")
    sub.close()
    gone_at = time.monotonic()
    pub.publish("se/t", b"after-expiry")
    wait_metric_above("outpost_broker_sessions_expired_total", expired_before,
                      "the broker to discard the offline session")
    elapsed = time.monotonic() - gone_at
    check(elapsed >= interval - 0.05,
          f"session discarded no earlier than its {interval} s interval (after {elapsed:.2f} s)")
    sub = connect("se-late", client_id="se", clean=False, session_expiry=interval,
                  expect_present=False)
    check_eq(sub.subscribe([("se/t", 1)]), [1], "SUBACK")
    pub.publish("se/t", b"sentinel")
    sub.expect_sequence(["sentinel"], "nothing from the discarded session's queue")
    sub.close()

    zero = connect("se0", client_id="se0", expect_present=False)
    zero.subscribe([("se/t", 1)])
    zero.close()
    connect("se0-back", client_id="se0", clean=False, expect_present=False).close()

    # A DISCONNECT may end the session at once by setting its interval to 0.
    long = connect("se-dis", client_id="se-dis", session_expiry=300)
    long.client.disconnect(properties=props(PacketTypes.DISCONNECT, SessionExpiryInterval=0))
    long.wait_disconnect()
    connect("se-dis-back", client_id="se-dis", clean=False, session_expiry=300,
            expect_present=False).close()
    pub.close()


def expiring(seconds):
    return props(PacketTypes.PUBLISH, MessageExpiryInterval=seconds)


@rule
def mqtt5_message_expiry_applies_in_offline_queue():
    """A message whose expiry interval runs out while it waits in a queue (an offline session's,
    or behind a full receive window) is not delivered, and is counted; one still valid arrives
    with the interval reduced by the time it waited; one without expiry has no interval. An
    immediate delivery carries the interval."""
    online = connect("online")
    online.subscribe([("mx/online", 1)])
    pub = connect("mx-pub")
    pub.publish("mx/online", b"fresh", properties=expiring(60))
    pub.publish("mx/online", b"forever")
    fresh, forever = online.expect_sequence(["fresh", "forever"], "online deliveries")
    left = prop(fresh, "MessageExpiryInterval")
    check(left is not None and 55 <= left <= 60,
          f"online delivery carries expiry <= 60 s (got {left})")
    check_eq(prop(forever, "MessageExpiryInterval"), None, "no expiry property without an expiry")

    offline = connect("mx", client_id="mx", session_expiry=300)
    offline.subscribe([("mx/q", 1)])
    offline.close()
    # Receive Maximum 1 and the first message not acked: the rest wait in the online backlog.
    backlog = connect("mx-backlog", receive_maximum=1, manual_ack=True)
    backlog.subscribe([("mx/q", 1)])
    for payload, expiry in (("first", None), ("short", 1), ("long", 30), ("none", None)):
        pub.publish("mx/q", payload.encode(), properties=expiring(expiry) if expiry else None)
    queued_at = time.monotonic()
    backlog.wait("the first message", lambda: backlog.messages or None)
    # The rule is about time passing: let "short" (1 s) run out, with a margin.
    time.sleep(2.2)
    offline = connect("mx-back", client_id="mx", clean=False, session_expiry=300,
                      expect_present=True)
    backlog.ack_on_arrival = True
    first = backlog.messages[0]
    backlog.client.ack(first.mid, first.qos)
    for c, what in ((offline, "offline queue"), (backlog, "online backlog")):
        got = c.expect_sequence(["first", "long", "none"],
                                f"{what}: everything but the expired message")
        waited = time.monotonic() - queued_at
        left = prop(got[1], "MessageExpiryInterval")
        check(left is not None and 1 <= left <= 28,
              f"{what}: message arrives with its expiry reduced by the {waited:.1f} s it waited "
              f"(30 -> {left})")
        check_eq(prop(got[2], "MessageExpiryInterval"), None, f"{what}: message without expiry")
    for c in (online, offline, backlog, pub):
        c.close()
    counters(messages_expired=2)


@rule
def mqtt5_message_expiry_applies_to_retained_messages():
    """A retained message is sent to new subscribers with its expiry interval reduced by the
    time it was kept, and not at all once the interval has run out."""
    pub = connect("rx-pub")
    pub.publish("rx/stale", b"stale", retain=True, properties=expiring(1))
    pub.publish("rx/kept", b"kept", retain=True, properties=expiring(30))
    # The rule is about time passing: let "stale" (1 s) run out, with a margin.
    time.sleep(2.2)
    late = connect("rx-late")
    late.subscribe([("rx/#", 1)])
    pub.publish("rx/live", b"live")
    got = late.expect_sequence(["kept", "live"],
                               "new subscriber: the retained message still valid only")
    left = prop(got[0], "MessageExpiryInterval")
    check(left is not None and 1 <= left <= 28, f"retained message's expiry reduced (30 -> {left})")
    check_eq(int(got[0].retain), 1, "retained delivery has retain=1")
    late.close()
    pub.close()
    # The expired one was dropped from the retained store, and counted.
    counters(messages_expired=1)


@rule
def mqtt5_session_gone_once_expiry_interval_passed():
    """A client reconnecting (clean start 0) after its session expiry interval has passed gets no
    session (session present 0, nothing queued delivered), also when it is back before the
    broker's periodic expiry sweep: 5 times, 100 ms after the interval."""
    pub = connect("sg-pub")
    present = []
    for i in range(5):
        c = connect(f"sg{i}", client_id=f"sg{i}", session_expiry=1)
        c.subscribe([("sg/t", 1)])
        c.close()
        pub.publish("sg/t", f"queued-{i}".encode())
        # The rule is about time passing: the 1 s interval, and 100 ms more.
        time.sleep(1.1)
        # Expiry 0 now: this session ends with the connection (and is not counted as expired).
        back = connect(f"sg{i}-back", client_id=f"sg{i}", clean=False, session_expiry=0)
        present.append(int(back.connack[1]))
        back.close()
    check_eq(present, [0] * 5, "session present after reconnecting 1.1 s after a 1 s interval")
    counters(sessions_expired=5)


@rule
def mqtt5_will_sent_once_delay_passed_even_if_client_reconnects_after():
    """A will whose delay has passed is published even if the client reconnects (clean start 0)
    right after, before the broker's periodic sweep: only reconnecting within the delay cancels
    it. 5 times, reconnecting 100 ms after the delay."""
    watcher = connect("wl-watch")
    watcher.subscribe([("wl/#", 1)])
    for i in range(5):
        will = {"topic": f"wl/{i}", "payload": f"will-{i}", "qos": 1,
                "properties": props(PacketTypes.WILLMESSAGE, WillDelayInterval=1)}
        c = connect(f"wl{i}", client_id=f"wl{i}", session_expiry=60, will=will)
        c.drop()
        time.sleep(1.1)
        connect(f"wl{i}-back", client_id=f"wl{i}", clean=False, session_expiry=60).close()
    connect("wl-pub").publish("wl/end", b"end")
    got = [m.payload.decode() for m in watcher.until("end")[:-1]]
    check_eq(sorted(got, key=lambda p: int(p.split("-")[1])), [f"will-{i}" for i in range(5)],
             "wills published (delay 1 s, client back after 1.1 s)")


@rule
def mqtt5_will_delay_sends_will_after_delay_not_on_quick_reconnect():
    """A will with a delay is published once the delay has passed after the connection died,
    not before; reconnecting within the delay cancels it; a session that ends first sends it."""
    watcher = connect("watcher")
    watcher.subscribe([("wd/#", 1)])

    def will_client(name, delay, expiry):
        will = {"topic": f"wd/{name}", "payload": f"will-{name}", "qos": 1,
                "properties": props(PacketTypes.WILLMESSAGE, WillDelayInterval=delay)}
        return connect(name, client_id=name, session_expiry=expiry, will=will)

    late = will_client("late", 2, 60)
    late.drop()
    dropped_at = time.monotonic()
    watcher.until("will-late")
    elapsed = time.monotonic() - dropped_at
    check(elapsed >= 2.0, f"will sent after its 2 s delay, not before ({elapsed:.2f} s)")

    back = will_client("back", 3, 60)
    back.drop()
    connect("back-again", client_id="back", clean=False, session_expiry=60, expect_present=True)
    # Dropped after "back" reconnected, with the same delay: its will comes after any of back's.
    marker = will_client("marker", 3, 60)
    marker.drop()
    watcher.expect_sequence(["will-marker"],
                            "no will for a client that reconnected within the delay")

    short = will_client("short-session", 30, 1)
    short.drop()
    dropped_at = time.monotonic()
    watcher.until("will-short-session")
    elapsed = time.monotonic() - dropped_at
    check(elapsed < 20,
          f"will sent when the 1 s session ended, before its 30 s delay ({elapsed:.2f} s)")
    watcher.close()


@rule
def mqtt5_disconnect_with_will_message_publishes_will():
    """DISCONNECT with reason 0x04 (disconnect with will message) publishes the will; a normal
    DISCONNECT (0x00) discards it."""
    watcher = connect("watcher")
    watcher.subscribe([("dw/#", 1)])
    for name, reason in (("normal", "Normal disconnection"),
                         ("with-will", "Disconnect with will message")):
        c = connect(name, will={"topic": f"dw/{name}", "payload": f"will-{name}", "qos": 1})
        c.client.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT, reason))
        c.wait_disconnect()
    watcher.expect_sequence(["will-with-will"], "only the will of the DISCONNECT with reason 0x04")
    watcher.close()


# =============================================================================================
# MQTT 5: flow control, sizes, aliases
# =============================================================================================

def hold_acks_and_count(sub, total, receive_max):
    """With `sub`'s acks held back (manual_ack), checks that no more than `receive_max` of the
    `total` messages arrive unacknowledged; then acks one at a time, checking that each ack lets
    exactly one more through, until all arrived."""
    sub.wait(f"{receive_max} messages", lambda: True if len(sub.messages) >= receive_max else None)
    # A round trip on the subscriber's connection, then a moment, for any excess to show.
    sub.unsubscribe(["rm/none"])
    time.sleep(0.5)
    check_eq(len(sub.messages), receive_max, f"{sub.name}: messages delivered with no ack sent")
    max_unacked = 0
    for acked in range(1, total + 1):
        with sub.cond:
            max_unacked = max(max_unacked, len(sub.messages) - (acked - 1))
        m = sub.messages[acked - 1]
        sub.client.ack(m.mid, m.qos)
        want = min(total, acked + receive_max)
        sub.wait(f"message {want} after ack {acked}",
                 lambda: True if len(sub.messages) >= want else None)
    check(max_unacked <= receive_max,
          f"{sub.name}: never more than {receive_max} unacked (max seen {max_unacked})")


@rule
def mqtt5_receive_maximum_bounds_unacked_qos1_and_qos2_in_flight():
    """With Receive Maximum 3 and its acks held back (PUBACK for QoS 1, PUBCOMP for QoS 2), a
    client never has more than 3 messages in flight from the broker; each ack lets one more
    through; all arrive, in order, once."""
    receive_max, total = 3, 12
    pub = connect("rm-pub")
    for qos in (1, 2):
        sub = connect(f"rm-q{qos}", receive_maximum=receive_max, manual_ack=True)
        sub.subscribe([(f"rm/q{qos}", qos)])
        for i in range(total):
            pub.publish(f"rm/q{qos}", f"m{i}".encode(), qos=qos)
        # All are in the broker now: each was acked to the publisher after routing.
        hold_acks_and_count(sub, total, receive_max)
        check_eq(sub.payloads(), [f"m{i}" for i in range(total)],
                 f"{sub.name}: every message once, in order")
        check(all(m.qos == qos for m in sub.messages), f"{sub.name}: delivered at QoS {qos}")
        sub.close()
    pub.close()


@rule
def mqtt5_receive_maximum_applies_to_messages_resent_on_reconnect():
    """A client resuming its session with Receive Maximum 1 gets one unacknowledged message at a
    time, also when the session holds more unacked ones from the previous connection (MQTT 5
    §4.9: the quota starts afresh on each connection); the others follow as it acks."""
    sub = connect("rr", client_id="rr", session_expiry=60, receive_maximum=3, manual_ack=True)
    sub.subscribe([("rr/t", 1)])
    pub = connect("rr-pub")
    for i in range(6):
        pub.publish("rr/t", f"m{i}".encode())
    sub.wait("3 messages", lambda: True if len(sub.messages) >= 3 else None)
    sub.drop()  # m0..m2 unacked
    back = connect("rr-back", client_id="rr", clean=False, session_expiry=60, receive_maximum=1,
                   manual_ack=True, expect_present=True)
    back.wait("the first resent message", lambda: back.messages or None)
    back.unsubscribe(["rr/none"])  # a round trip, then a moment for any excess to show
    time.sleep(0.5)
    check_eq(back.payloads(), ["m0"], "unacked messages after resuming with Receive Maximum 1")
    check_eq(int(back.messages[0].dup), 1, "the resent message carries DUP")


@rule
def mqtt5_maximum_packet_size_of_client_is_respected():
    """A client announcing Maximum Packet Size 256 never receives a larger packet: larger
    messages (QoS 0 and 1, more of them than its receive maximum) are dropped for it, the small
    ones around them arrive, and a client without the limit receives everything."""
    limit = 256
    small = connect("mps", client_id="mps", maximum_packet_size=limit, receive_maximum=2)
    small.subscribe([("mps/#", 1)])
    big = connect("mps-any")
    big.subscribe([("mps/#", 1)])
    pub = connect("mps-pub")
    sent = []
    for i in range(4):
        for qos in (0, 1):
            name = f"big-{i}-q{qos}"
            pub.publish("mps/t", name.encode().ljust(limit + 10, b"."), qos=qos)
            sent.append(name)
        pub.publish("mps/t", f"small-{i}".encode(), qos=1)
        sent.append(f"small-{i}")
    got = small.until("small-3")
    check_eq([m.payload.decode() for m in got], [f"small-{i}" for i in range(4)],
             "the limited client receives exactly the small messages")
    for m in got:
        size = packet_size(m)
        check(size <= limit, f"packet of {size} bytes <= {limit}")
    # (QoS 0 and QoS 1 are ordered separately: compare as sets.)
    got = big.until("small-3")
    check_eq(sorted(m.payload.decode().rstrip(".") for m in got), sorted(sent),
             "a client without a limit receives every message")
    for c in (small, big, pub):
        c.close()


def packet_size(m):
    """Size in bytes of the PUBLISH that carried message `m` (MQTT 5)."""
    body = (2 + len(m.topic.encode()) + (2 if m.qos else 0) + len(m.properties.pack())
            + len(m.payload))
    length_bytes = 1
    while body >= 128 ** length_bytes:
        length_bytes += 1
    return 1 + length_bytes + body


@rule
def mqtt5_maximum_packet_size_of_broker_is_enforced():
    """CONNACK announces the broker's Maximum Packet Size; a larger PUBLISH gets DISCONNECT 0x95
    and is not delivered; one at the limit is accepted."""
    sub = connect("mpb-sub")
    sub.subscribe([("mpb/#", 1)])
    c = connect("mpb")
    limit = prop(c.connack[2], "MaximumPacketSize")
    check(limit is not None and limit > 0, f"CONNACK announces a maximum packet size ({limit})")
    topic = "mpb/t"
    overhead = packet_size_overhead(topic, limit)
    check_eq(c.publish(topic, b"f" * (limit - overhead), qos=1), SUCCESS,
             f"a PUBLISH of exactly {limit} bytes is accepted")
    c.publish(topic, b"o" * (limit - overhead + 1), qos=1, wait=False)
    check_eq(c.wait_disconnect(), (PACKET_TOO_LARGE, True),
             f"DISCONNECT for a PUBLISH of {limit + 1} bytes")
    pub = connect("mpb-pub")
    pub.publish(topic, b"sentinel")
    got = sub.until("sentinel")
    check_eq([len(m.payload) for m in got], [limit - overhead, len(b"sentinel")],
             "the oversized message is not delivered (payload sizes received)")
    counters(oversized_packets=1)


def packet_size_overhead(topic, limit):
    """Bytes a QoS 1 MQTT 5 PUBLISH with no properties adds to its payload, near `limit`."""
    body = 2 + len(topic) + 2 + 1
    length_bytes = 1
    while limit >= 128 ** length_bytes:
        length_bytes += 1
    return 1 + length_bytes + body


@rule
def mqtt5_topic_alias_from_client_resolves_to_topic():
    """A client may set topic aliases (up to CONNACK's Topic Alias Maximum) and then publish
    with the alias alone; re-mapping an alias changes its topic. Subscribers get the full topic
    name and no alias."""
    sub = connect("ta-sub")
    sub.subscribe([("ta/#", 1)])
    c = connect("ta", client_id="ta")
    alias_max = prop(c.connack[2], "TopicAliasMaximum", 0)
    check(alias_max >= 2, f"CONNACK announces a topic alias maximum ({alias_max})")

    def alias(n):
        return props(PacketTypes.PUBLISH, TopicAlias=n)

    steps = [("ta/one", 1, "one-set"), ("", 1, "one-alias"), ("ta/two", alias_max, "two-set"),
             ("", alias_max, "two-alias"), ("ta/three", 1, "remapped"), ("", 1, "three-alias"),
             ("", alias_max, "two-again")]
    for topic, n, payload in steps:
        check_eq(c.publish(topic, payload.encode(), qos=1, properties=alias(n)), SUCCESS,
                 f"PUBACK for {payload} (topic {topic!r}, alias {n})")
    got = sub.expect_sequence([p for _, _, p in steps], "deliveries")
    check_eq([m.topic for m in got],
             ["ta/one", "ta/one", "ta/two", "ta/two", "ta/three", "ta/three", "ta/two"],
             "topics as delivered (aliases resolved)")
    check(all(prop(m, "TopicAlias") is None for m in got), "no alias sent to the subscriber")
    c.close()
    sub.close()
    # Aliases belong to the connection: the same client's next connection has none.
    again = connect("ta-again", client_id="ta")
    again.publish("", b"stale-alias", qos=1, properties=alias(1), wait=False)
    check_eq(again.wait_disconnect(), (PROTOCOL_ERROR, True),
             "DISCONNECT 0x82 for an alias set on an earlier connection only")


# =============================================================================================
# MQTT 5: identity, properties, subscriptions
# =============================================================================================

@rule
def mqtt5_assigned_client_identifier_for_empty_client_id():
    """An empty client id gets an Assigned Client Identifier in CONNACK, unique per client,
    and the session is that id's: reconnecting with it finds the session."""
    a = connect("anon-a", session_expiry=60)
    b = connect("anon-b")
    id_a = prop(a.connack[2], "AssignedClientIdentifier")
    id_b = prop(b.connack[2], "AssignedClientIdentifier")
    check(bool(id_a) and bool(id_b), f"CONNACK assigns client ids ({id_a!r}, {id_b!r})")
    check(id_a != id_b, "assigned ids differ")
    a.subscribe([("aci/t", 1)])
    a.close()
    b.publish("aci/t", b"for-a")
    back = connect("anon-a-back", client_id=id_a, clean=False, session_expiry=60,
                   expect_present=True)
    back.expect_sequence(["for-a"], "the assigned id's session kept its queue")
    back.close()
    b.close()


@rule
def mqtt5_message_properties_pass_through_to_v5_subscriber():
    """User properties (order and repeats kept), content type, payload format indicator, response
    topic and correlation data reach an MQTT 5 subscriber unchanged, from a PUBLISH and from a
    will; a 3.1.1 subscriber gets the payload."""
    v5 = connect("props-v5")
    v5.subscribe([("props/#", 1)])
    v3 = connect("props-v3", v5=False)
    v3.subscribe([("props/#", 1)])
    pub = connect("props-pub")
    user = [("site", "north"), ("unit", "C"), ("site", "south")]
    values = {"UserProperty": user, "ContentType": "application/json", "PayloadFormatIndicator": 1,
              "ResponseTopic": "props/reply", "CorrelationData": b"\x00\x01corr\xff"}
    pub.publish("props/t", b'{"t": 1}', properties=props(PacketTypes.PUBLISH, **values))
    pub.publish("props/t", b"plain", qos=1)
    will = {"topic": "props/will", "payload": b'{"gone": true}', "qos": 1,
            "properties": props(PacketTypes.WILLMESSAGE, **values)}
    connect("props-will", will=will).drop()
    m, plain, will_msg = v5.expect_sequence(['{"t": 1}', "plain", '{"gone": true}'],
                                            "v5 deliveries")
    for name, value in values.items():
        check_eq(prop(m, name), value, f"PUBLISH {name}")
        check_eq(prop(will_msg, name), value, f"will {name}")
        check_eq(prop(plain, name), None, f"no {name} on a message published without it")
    v3.expect_sequence(['{"t": 1}', "plain", '{"gone": true}'], "3.1.1 subscriber payloads")
    for c in (v5, v3, pub):
        c.close()


@rule
def mqtt5_no_local_skips_own_publications():
    """With noLocal the subscriber does not get its own messages, but gets others'; without it,
    it gets its own."""
    n = connect("nl", client_id="nl")
    n.subscribe([("nl/#", opts(noLocal=True))])
    m = connect("nl-other", client_id="nl-other")
    m.subscribe([("nl/#", opts(noLocal=False))])
    n.publish("nl/t", b"from-nl")
    m.publish("nl/t", b"from-other")
    n.expect_sequence(["from-other"], "noLocal subscriber: only the other client's message")
    m.expect_sequence(["from-nl", "from-other"], "subscriber without noLocal: its own too")
    n.close()
    m.close()


@rule
def mqtt5_retain_as_published_keeps_retain_flag():
    """Retained messages sent on subscribe have retain=1 for everyone; a live retained publish
    is forwarded with retain=1 only to retain-as-published subscriptions, retain=0 otherwise."""
    pub = connect("rap-pub")
    pub.publish("rap/old", b"old", retain=True)
    plain = connect("rap-plain")
    plain.subscribe([("rap/#", opts(retainAsPublished=False))])
    keep = connect("rap-keep")
    keep.subscribe([("rap/#", opts(retainAsPublished=True))])
    pub.publish("rap/new", b"new", retain=True)
    pub.publish("rap/new", b"plain", retain=False)
    for c, want in ((plain, [1, 0, 0]), (keep, [1, 1, 0])):
        got = c.expect_sequence(["old", "new", "plain"], f"{c.name}: deliveries")
        check_eq([int(m.retain) for m in got], want, f"{c.name}: retain flags (old, new, plain)")
    for c in (pub, plain, keep):
        c.close()


@rule
def mqtt5_retain_handling_0_1_2():
    """Retain handling 0 sends retained messages on every subscribe, 1 only when the
    subscription is new, 2 never."""
    pub = connect("rh-pub")
    pub.publish("rh/t", b"retained", retain=True)
    subs = {}
    for handling in (0, 1, 2):
        c = connect(f"rh{handling}")
        for _ in range(2):  # subscribe, then the same subscription again
            check_eq(c.subscribe([("rh/t", opts(retainHandling=handling))]), [1],
                     f"rh{handling}: SUBACK")
        subs[handling] = c
    pub.publish("rh/t", b"live")
    subs[0].expect_sequence(["retained", "retained", "live"],
                            "retain handling 0: on each subscribe")
    subs[1].expect_sequence(["retained", "live"], "retain handling 1: on the new subscription only")
    subs[2].expect_sequence(["live"], "retain handling 2: never")
    # A subscription made new again (after unsubscribe) gets it again with handling 1.
    subs[1].unsubscribe(["rh/t"])
    subs[1].subscribe([("rh/t", opts(retainHandling=1))])
    subs[1].expect_sequence(["retained"], "retain handling 1 after unsubscribe and subscribe")
    for c in [pub, *subs.values()]:
        c.close()


def check_subscription_ids(got, payload, matching):
    """The copies of `payload` in `got` carry the identifiers of the `matching` subscriptions
    (None: one without an identifier): one copy with all of them, or one copy per subscription
    with its own (MQTT 5 §3.3.4: a server may send a copy per overlapping subscription)."""
    copies = [sorted(prop(m, "SubscriptionIdentifier", [])) for m in got
              if m.payload.decode() == payload]
    one = [sorted(i for i in matching if i is not None)]
    each = sorted([i] if i is not None else [] for i in matching)
    check(copies == one or (len(copies) > 1 and sorted(copies) == each),
          f"{payload!r}: identifiers per copy {copies} (one copy {one[0]} or one per "
          f"subscription {each})")


def sub_id(n):
    return props(PacketTypes.SUBSCRIBE, SubscriptionIdentifier=n)


@rule
def mqtt5_subscription_identifiers_on_delivery():
    """A delivery carries the identifiers of the matching subscriptions (all of them on a single
    copy); a subscription without one adds none; a new SUBSCRIBE of the same filter replaces its
    identifier; a retained message sent on SUBSCRIBE carries that subscription's."""
    c = connect("sid")
    c.subscribe([("sid/#", 1)], properties=sub_id(7))
    c.subscribe([("sid/+/b", 1)], properties=sub_id(9000))
    c.subscribe([("sid/plain", 1)])
    pub = connect("sid-pub")
    for topic, payload in (("sid/a/b", "both"), ("sid/a", "one"), ("sid/plain", "plain")):
        pub.publish(topic, payload.encode())
    got = c.until("plain")
    check_subscription_ids(got, "both", [7, 9000])
    check_subscription_ids(got, "one", [7])
    check_subscription_ids(got, "plain", [7, None])
    c.subscribe([("sid/#", 1)], properties=sub_id(8))
    pub.publish("sid/a", b"replaced")
    got = c.expect_sequence(["replaced"], "after re-subscribing")
    check_eq(prop(got[0], "SubscriptionIdentifier"), [8], "the new identifier replaced the old")
    pub.publish("sid-ret/t", b"retained", retain=True)
    late = connect("sid-late")
    late.subscribe([("sid-ret/#", 1)], properties=sub_id(42))
    got = late.expect_sequence(["retained"], "retained message on subscribe")
    check_eq(prop(got[0], "SubscriptionIdentifier"), [42], "its subscription identifier")
    for x in (c, pub, late):
        x.close()


@rule
def mqtt5_shared_subscription_splits_messages_across_group():
    """$share/g/filter: each message goes to exactly one member of the group, every member gets
    some; another group and a plain subscriber each get every message; a shared subscribe gets
    no retained messages."""
    total = 30
    pub = connect("sh-pub")
    pub.publish("sh/data/retained", b"retained", retain=True)
    members = []
    for i in range(3):
        m = connect(f"g1-m{i}", client_id=f"g1-m{i}")
        check_eq(m.subscribe([("$share/g1/sh/data/#", 1), ("sh/end", 1)]), [1, 1],
                 f"{m.name}: SUBACK")
        members.append(m)
    solo = connect("g2-solo")
    solo.subscribe([("$share/g2/sh/data/#", 1), ("sh/end", 1)])
    plain = connect("plain")
    plain.subscribe([("sh/data/#", 1), ("sh/end", 1)])
    sent = [f"s{i}" for i in range(total)]
    for p in sent:
        pub.publish("sh/data/x", p.encode())
    # sh/end is an ordinary subscription of every member: whatever the group sent a member
    # was queued before it.
    pub.publish("sh/end", b"end")
    shares = {m.name: [x.payload.decode() for x in m.until("end")[:-1]] for m in members}
    check(all("retained" not in got for got in shares.values()),
          "no retained message on a shared subscribe")
    delivered = sorted((p for got in shares.values() for p in got), key=lambda p: (len(p), p))
    check_eq(delivered, sent, "group g1 together received each message exactly once")
    for name, got in shares.items():
        check(len(got) > 0, f"{name} received a share of the messages ({len(got)})")
    for c, what in ((solo, "group g2's only member"), (plain, "a plain subscriber")):
        got = [m.payload.decode() for m in c.until("end")[:-1]]
        expect = sent if c is solo else ["retained"] + sent
        check_eq(got, expect, f"{what} receives every message")
    for c in [pub, solo, plain, *members]:
        c.close()


def qos_matrix(v5, prefix):
    """Subscribers granted QoS 0, 1, 2 each receive messages published at QoS 0, 1, 2 at the
    lower of the two, and a retained QoS 2 message on subscribe at their granted QoS."""
    pub = connect(f"{prefix}-pub", v5=v5)
    pub.publish(f"{prefix}/t", b"retained", qos=2, retain=True)
    subs = []
    for granted in (0, 1, 2):
        c = connect(f"{prefix}-sub{granted}", v5=v5)
        got = c.subscribe([(f"{prefix}/t", granted)])
        check(len(got) == 1 and got[0] <= granted, f"{c.name}: granted {got} (asked {granted})")
        subs.append((c, got[0]))
    for q in (0, 1, 2):
        pub.publish(f"{prefix}/t", f"pub{q}".encode(), qos=q)
    sent = {"retained": 2, "pub0": 0, "pub1": 1, "pub2": 2}
    for c, granted in subs:
        got = c.expect_set(sent, f"{c.name}: deliveries")
        check_eq({p: m.qos for p, m in got.items()}, {p: min(q, granted) for p, q in sent.items()},
                 f"{c.name}: delivered QoS per message (published QoS {sent}, granted {granted})")
    for c, _ in subs:
        c.close()
    pub.close()


@rule
def mqtt5_delivered_qos_is_min_of_published_and_granted():
    """Delivered QoS = min(published QoS, granted QoS): never above either."""
    qos_matrix(True, "q5")


# =============================================================================================
# MQTT 3.1.1
# =============================================================================================

@rule
def mqtt311_persistent_session_queues_qos1_while_offline():
    """clean session 0: the subscription survives a disconnect and QoS 1 messages published
    while the client is away are delivered when it returns (session present 1); connecting with
    clean session 1 ends it."""
    sub = connect("p311", client_id="p311", v5=False, clean=False)
    check_eq(sub.subscribe([("p311/t", 1)]), [1], "SUBACK granted 1")
    sub.close()
    pub = connect("p311-pub", v5=False)
    for p in ("queued-1", "queued-2"):
        pub.publish("p311/t", p.encode(), qos=1)
    sub = connect("p311-back", client_id="p311", v5=False, clean=False, expect_present=True)
    got = sub.expect_sequence(["queued-1", "queued-2"], "QoS 1 queued while offline, in order")
    check(all(m.qos == 1 for m in got), "delivered at QoS 1")
    sub.close()
    connect("p311-clean", client_id="p311", v5=False, clean=True, expect_present=False).close()
    connect("p311-after", client_id="p311", v5=False, clean=False, expect_present=False).close()
    pub.close()


@rule
def mqtt311_clean_session_keeps_nothing():
    """clean session 1: after a disconnect there is no session (session present 0), no
    subscription and nothing queued."""
    sub = connect("c311", client_id="c311", v5=False, clean=True, expect_present=False)
    sub.subscribe([("c311/t", 1)])
    sub.close()
    pub = connect("c311-pub", v5=False)
    pub.publish("c311/t", b"lost", qos=1)
    sub = connect("c311-back", client_id="c311", v5=False, clean=True, expect_present=False)
    sub.subscribe([("c311/t", 1)])
    pub.publish("c311/t", b"after", qos=1)
    sub.expect_sequence(["after"], "nothing kept from the previous connection")
    sub.close()
    pub.close()


@rule
def mqtt311_retained_message_for_new_subscribers_until_cleared():
    """A retained message goes to each new subscriber with retain=1 (live subscribers get it
    with retain=0), a newer one replaces it, an empty retained publish clears it."""
    live = connect("ret-live", v5=False)
    live.subscribe([("ret311/t", 1)])
    pub = connect("ret-pub", v5=False)
    pub.publish("ret311/t", b"v1", qos=1, retain=True)
    pub.publish("ret311/t", b"v2", qos=1, retain=True)
    got = live.expect_sequence(["v1", "v2"], "live subscriber")
    check_eq([int(m.retain) for m in got], [0, 0], "live deliveries have retain=0")
    late = connect("ret-late", v5=False)
    late.subscribe([("ret311/#", 1)])
    got = late.expect_sequence(["v2"], "new subscriber gets the latest retained message")
    check_eq(int(got[0].retain), 1, "retained delivery has retain=1")
    pub.publish("ret311/t", b"", qos=1, retain=True)
    cleared = connect("ret-cleared", v5=False)
    cleared.subscribe([("ret311/#", 1)])
    pub.publish("ret311/t", b"live", qos=1)
    cleared.expect_sequence(["live"], "no retained message after the empty retained publish")
    for c in (live, pub, late, cleared):
        c.close()


@rule
def mqtt311_will_published_on_abrupt_close():
    """A client whose connection ends without DISCONNECT has its will published (with its QoS and
    retain flag); one that disconnects cleanly does not."""
    watcher = connect("w311", v5=False)
    watcher.subscribe([("will311/#", 1)])

    def will_client(name, retain):
        will = {"topic": f"will311/{name}", "payload": f"will-{name}", "qos": 1, "retain": retain}
        return connect(name, client_id=name, v5=False, will=will)

    will_client("polite", False).close()
    will_client("crashed", True).drop()
    got = watcher.expect_sequence(["will-crashed"], "the abruptly closed client's will only")
    check_eq((got[0].topic, got[0].qos), ("will311/crashed", 1), "will topic and QoS")
    late = connect("w311-late", v5=False)
    late.subscribe([("will311/#", 1)])
    got = late.expect_sequence(["will-crashed"], "the retained will for a later subscriber")
    check_eq(int(got[0].retain), 1, "retained will delivered with retain=1")
    watcher.close()
    late.close()


@rule
def mqtt311_delivered_qos_is_downgraded_to_granted():
    """3.1.1: delivered QoS = min(published QoS, granted QoS)."""
    qos_matrix(False, "q311")


# =============================================================================================
# Authentication (password file from mosquitto_passwd), anonymous clients
# =============================================================================================

def users():
    return [tuple(u.split(":", 1)) for u in OPTS.user]


@rule
def password_file_users_log_in():
    """Every user of the mosquitto_passwd file logs in with its password, MQTT 5 and 3.1.1, on
    the listener that refuses anonymous clients, and can publish."""
    for name, password in users():
        for v5 in (True, False):
            c = connect(f"{name}-v{5 if v5 else 3}", v5=v5, username=name, password=password)
            check_eq(c.publish("auth/t", b"hello"), SUCCESS, f"{c.name}: logged in and published")
            c.close()


@rule
def wrong_password_and_unknown_user_are_refused():
    """A wrong password and an unknown user get CONNACK 0x86 (MQTT 5) / return code 4 (3.1.1:
    paho's "Bad user name or password")."""
    name, password = users()[0]
    attempts = [("wrong-password", name, password + "x"), ("unknown-user", "nobody", password),
                ("empty-password", name, ""), ("no-password", name, None)]
    for label, user, pw in attempts:
        for v5 in (True, False):
            got = refused_connect(f"{label}-v{5 if v5 else 3}", v5=v5, username=user, password=pw)
            check_eq(got, BAD_USERNAME_OR_PASSWORD,
                     f"{label} ({'MQTT 5' if v5 else '3.1.1'}): CONNACK bad user name or password")
    counters(auth_refused=2 * len(attempts))


@rule
def anonymous_refused_where_configured():
    """Without a username: refused with CONNACK 0x87 (MQTT 5) / return code 5 (3.1.1: paho's
    "Not authorized") on the listener with allow_anonymous = false, admitted on the one with
    allow_anonymous = true (--anon-port)."""
    for v5 in (True, False):
        got = refused_connect(f"anon-v{5 if v5 else 3}", v5=v5)
        check_eq(got, NOT_AUTHORIZED,
                 f"anonymous ({'MQTT 5' if v5 else '3.1.1'}): CONNACK not authorised")
        c = connect(f"anon-ok-v{5 if v5 else 3}", v5=v5, port=OPTS.anon_port)
        check_eq(c.publish("auth/anon", b"x"), SUCCESS, "anonymous client admitted where allowed")
        c.close()
    counters(auth_refused=2)


# =============================================================================================
# ACL: two devices, each only its own topics (`pattern` with %c and %u)
# =============================================================================================

def device(name, v5, **kw):
    """Device `name` logs in with client id and username `name` (password from --user)."""
    password = dict(users())[name]
    return connect(f"{name}-v{5 if v5 else 3}", client_id=name, v5=v5, username=name,
                   password=password, **kw)


def acl_matrix(v5):
    """Runs the matrix; returns the expected counter moves."""
    names = [n for n, _ in users()][:2]
    # A will is a write too: one on the other device's topic is refused at CONNECT (0x87 / 5).
    for actor, other in (names, names[::-1]):
        will = {"topic": f"devices/{other}/status", "payload": "forged", "qos": 1}
        got = refused_connect(f"{actor}-forged-will", client_id=actor, v5=v5, username=actor,
                              password=dict(users())[actor], will=will)
        check_eq(got, NOT_AUTHORIZED, f"{actor} with a will on devices/{other}/status refused")
    denied_pub = len(names)
    devs = {n: device(n, v5) for n in names}
    trees = ["devices/{c}", "users/{u}"]  # the ACL's `pattern`s: %c for one, %u for the other
    denied_sub = denied_delivery = 0
    forbidden_ack = NOT_AUTHORIZED if v5 else SUCCESS  # 3.1.1: acked and dropped
    forbidden_sub = NOT_AUTHORIZED if v5 else UNSPECIFIED_ERROR  # 3.1.1 SUBACK 0x80
    for actor, c in devs.items():
        rc = c.publish(f"devices/{actor}/state", f"state-{actor}".encode(), retain=True)
        check_eq(rc, SUCCESS, f"{actor} keeps a retained state on its own topic")
    for actor, c in devs.items():
        for owner in names:
            for tree in trees:
                base = tree.format(c=owner, u=owner)
                got = c.subscribe([(f"{base}/#", 1)])
                if owner == actor:
                    check_eq(got, [1], f"{actor} subscribes to its own {base}/#")
                else:
                    check_eq(got, [forbidden_sub], f"{actor} refused subscribing to {base}/#")
                    denied_sub += 1
        # A wildcard over both devices is granted (it matches the actor's own topics), but
        # delivers only what the actor may read: not the other's retained state either.
        check_eq(c.subscribe([("devices/#", 1)]), [1], f"{actor} subscribes to devices/#")
        denied_delivery += 1
    # Every device writes to every device's topics; only its own are accepted.
    for actor, c in devs.items():
        for owner in names:
            for tree in trees:
                topic = tree.format(c=owner, u=owner) + "/data"
                rc = c.publish(topic, f"{actor}->{topic}".encode(), qos=1)
                if owner == actor:
                    check_eq(rc, SUCCESS, f"{actor} publishes to its own {topic}")
                else:
                    check_eq(rc, forbidden_ack, f"{actor} refused publishing to {topic} "
                             f"({'PUBACK 0x87' if v5 else 'acked and dropped'})")
                    denied_pub += 1
    # Sentinels: each device's last own publish; everything it may read arrived before it.
    for actor, c in devs.items():
        c.publish(f"devices/{actor}/end", b"end", qos=1)
    for actor, c in devs.items():
        # Its own device topics match two of its subscriptions (devices/<c>/# and devices/#):
        # 3.1.1 allows a copy per subscription (and each SUBSCRIBE sends the retained state),
        # so compare what arrived, not how often.
        got = sorted({(m.topic, m.payload.decode()) for m in c.until("end")})
        own = [t.format(c=actor, u=actor) + "/data" for t in trees]
        expect = sorted([(own[0], f"{actor}->{own[0]}"), (own[1], f"{actor}->{own[1]}"),
                         (f"devices/{actor}/state", f"state-{actor}"),
                         (f"devices/{actor}/end", "end")])
        check_eq(got, expect, f"{actor} receives exactly its own messages")
        # The other's own device publish and its end marker matched this device's devices/#.
        denied_delivery += 2
    for c in devs.values():
        c.close()
    return {"publishes_denied": denied_pub, "subscriptions_denied": denied_sub,
            "deliveries_denied": denied_delivery}


@rule
def acl_v5_devices_read_and_write_only_their_own_topics():
    counters(**acl_matrix(True))


@rule
def acl_v311_devices_read_and_write_only_their_own_topics():
    counters(**acl_matrix(False))


# =============================================================================================
# TLS listeners
# =============================================================================================

def cert(name):
    return os.path.join(OPTS.certs, name)


def tls_files(ca="ca.pem", client=None):
    t = {"ca_certs": cert(ca)}
    if client:
        t["certfile"] = cert(f"{client}.pem")
        t["keyfile"] = cert(f"{client}.key")
    return t


@rule
def tls_client_trusting_test_ca_connects():
    """A client that trusts the test CA completes the handshake (server name 127.0.0.1 checked
    against the certificate) and talks MQTT 5 and 3.1.1 over it."""
    for v5 in (True, False):
        c = connect(f"tls-v{5 if v5 else 3}", v5=v5, port=OPTS.tls_port, tls=tls_files())
        c.subscribe([("tls/echo", 1)])
        check_eq(c.publish("tls/echo", b"over-tls"), SUCCESS, f"{c.name}: PUBACK over TLS")
        c.expect_sequence(["over-tls"], f"{c.name}: message back over TLS")
        check(isinstance(c.client.socket(), ssl.SSLSocket), f"{c.name}: the socket is TLS")
        c.close()


@rule
def tls_client_not_trusting_ca_is_refused():
    """A client that does not trust the server's CA (it trusts another) refuses the handshake;
    on the listener requiring client certificates, clients without one or with one from another
    CA are refused by the broker."""
    for v5 in (True, False):
        try:
            Conn(f"untrusting-v{5 if v5 else 3}", v5=v5, port=OPTS.tls_port,
                 tls=tls_files(ca="rogue-ca.pem")).open()
        except ssl.SSLCertVerificationError as e:
            check(True, f"untrusting client: certificate verification failed ({e.verify_message})")
        else:
            raise Failure("a client trusting another CA completed the TLS handshake")
    for label, files in (("no certificate", tls_files()),
                         ("a rogue certificate", tls_files(client="rogue"))):
        got = refused_connect(f"required-{label}", port=OPTS.tls_required_port, tls=files)
        check_eq(got, None, f"client with {label} gets no CONNACK where certificates are required")
    c = connect("required-ok", port=OPTS.tls_required_port, tls=tls_files(client="dev-tls"))
    c.close()
    check(True, "client with a certificate from the client CA is admitted")
    counters(tls_handshake_failures=4)


@rule
def tls_client_certificate_cn_is_the_username():
    """On a listener with a client CA, the certificate's CN is the username the ACL sees (which
    lets only user dev-tls write tls/dev-tls/#), whatever username the CONNECT claims; a client
    without a certificate there is anonymous."""
    watcher = connect("watcher")
    watcher.subscribe([("tls/#", 1)])

    def publish_as(label, **kw):
        c = connect(label, port=OPTS.tls_client_port, **kw)
        rc = c.publish("tls/dev-tls/data", label.encode())
        c.close()
        return rc

    check_eq(publish_as("cn-dev-tls", tls=tls_files(client="dev-tls")), SUCCESS,
             "certificate CN=dev-tls may publish tls/dev-tls/data")
    check_eq(publish_as("cn-dev-tls-claims-other", tls=tls_files(client="dev-tls"),
                        username="intruder", password="x"), SUCCESS,
             "the certificate's name wins over the CONNECT's username")
    check_eq(publish_as("cn-intruder", tls=tls_files(client="intruder")), NOT_AUTHORIZED,
             "certificate CN=intruder refused (PUBACK 0x87)")
    check_eq(publish_as("no-cert", tls=tls_files()), NOT_AUTHORIZED,
             "no certificate: anonymous, refused (PUBACK 0x87)")
    check_eq(publish_as("no-cert-claims-dev-tls", tls=tls_files(), username="dev-tls",
                        password="x"),
             NOT_AUTHORIZED, "no certificate, username dev-tls claimed: still anonymous")
    c = connect("cn-other-topic", port=OPTS.tls_client_port, tls=tls_files(client="dev-tls"))
    check_eq(c.publish("tls/other/data", b"x"), NOT_AUTHORIZED,
             "dev-tls refused outside its topics")
    check_eq(c.publish("tls/dev-tls/data", b"end"), SUCCESS, "sentinel")
    c.close()
    watcher.expect_sequence(["cn-dev-tls", "cn-dev-tls-claims-other", "end"],
                            "only dev-tls's messages were delivered")
    watcher.close()
    counters(publishes_denied=4)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rule", choices=sorted(RULES))
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--health-port", type=int)
    ap.add_argument("--anon-port", type=int)
    ap.add_argument("--user", action="append", default=[], help="NAME:PASSWORD")
    ap.add_argument("--tls-port", type=int)
    ap.add_argument("--tls-client-port", type=int)
    ap.add_argument("--tls-required-port", type=int)
    ap.add_argument("--certs")
    ap.parse_args(namespace=OPTS)
    try:
        RULES[OPTS.rule]()
    except Failure as e:
        print(f"FAIL {OPTS.rule}: {e}", flush=True)
        return 1
    print(f"PASS {OPTS.rule}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
