"""Connecting a paho-mqtt 2.x client and waiting for its CONNACK, shared by the publishers.

The caller owns `cond` (a threading.Condition) and `state` (a dict with "connected", "lost" and
"connack"); the callbacks installed here update them under `cond`, so the caller's own
callbacks and loops can wait on the same condition.
"""
import time


def connect_and_wait(client, host: str, port: int, cond, state: dict, timeout: float) -> bool:
    """Installs on_connect/on_disconnect, connects, starts paho's loop and waits for the CONNACK.

    True once connected; False (after printing why, loop stopped) if the connection failed,
    was refused or no CONNACK came within `timeout` seconds.
    """

    def on_connect(client, userdata, flags, reason_code, properties):
        with cond:
            state["connack"] = str(reason_code)
            state["connected"] = not reason_code.is_failure
            cond.notify_all()

    def on_disconnect(client, userdata, flags, reason_code, properties):
        with cond:
            state["lost"] = True
            state["connected"] = False
            cond.notify_all()

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    try:
        client.connect(host, port, keepalive=30)
    except OSError as e:
        print(f"connect failed: {e}", flush=True)
        return False
    client.loop_start()
    deadline = time.monotonic() + timeout
    with cond:
        while not state["connected"] and not state["lost"] and time.monotonic() < deadline:
            cond.wait(0.1)
        if not state["connected"]:
            print(f"not connected: connack={state['connack']}", flush=True)
            client.loop_stop()
            return False
    return True
