//! `[[check]]`s of the three kinds against real local peers: an HTTP check against Python's
//! http.server switched between 200 and 500 and then stopped, a TCP check against a port that
//! listens and then does not, and a command check (`test -f FILE`) that fails until the file
//! exists. With `failure_threshold = 2` and `recovery_threshold = 2`, a check goes
//! healthy -> degraded (1st failure) -> unhealthy (2nd) and back to healthy after 2 successes;
//! the states show in `/status` (`health.checks`) and in `/metrics`
//! (`outpost_check_state{check,state}` one-hot), and each change is stored on
//! `$gateway/checks/<name>` and arrives upstream on `outpost/<node>/$gateway/checks/<name>`,
//! in order, with the counts that made it.

use std::time::Duration;

use outpost_tests::{
    GatewayConfig, Mosquitto, Outpost, StatusHttpServer, Subscriber, SubscriberSpec, TcpAcceptor,
    TestDir, check_state, check_status, free_port, gateway_messages, scrape_metrics, wait_for,
    wait_health_status,
};
use serde_json::Value;

const NODE: &str = "gw-checks";
const WAIT: Duration = Duration::from_secs(30);

fn check_toml(name: &str, kind_lines: &str) -> String {
    format!(
        "[[check]]\nname = \"{name}\"\n{kind_lines}interval = \"500ms\"\ntimeout = \"400ms\"\nfailure_threshold = 2\nrecovery_threshold = 2\n\n"
    )
}

/// Waits until every (check, state) pair holds at once in `/status`.
fn wait_states(port: u16, want: &[(&str, &str)]) -> anyhow::Result<Value> {
    wait_health_status(port, &format!("check states {want:?}"), WAIT, |s| {
        want.iter().all(|(c, st)| check_state(s, c) == Some(*st))
    })
}

/// `outpost_check_state` for `check` is 1 for `state` and 0 for the three others.
fn assert_metric_state(port: u16, check: &str, state: &str) -> anyhow::Result<()> {
    let m = scrape_metrics(port)?;
    for s in ["unknown", "healthy", "degraded", "unhealthy"] {
        let v = m.get("outpost_check_state", &[("check", check), ("state", s)])?;
        assert_eq!(
            v,
            if s == state { 1.0 } else { 0.0 },
            "outpost_check_state{{check={check},state={s}}} while {check} is {state}"
        );
    }
    assert!(m.get("outpost_check_runs_total", &[("check", check)])? >= 2.0);
    Ok(())
}

/// The states that arrived upstream for `check`, in order (exact redeliveries dropped).
fn upstream_changes(sub: &Subscriber, check: &str) -> anyhow::Result<Vec<Value>> {
    let mut out: Vec<Value> = Vec::new();
    for (_, v) in gateway_messages(sub, NODE, &format!("checks/{check}"))? {
        if !out.contains(&v) {
            out.push(v);
        }
    }
    Ok(out)
}

fn states(changes: &[Value]) -> Vec<&str> {
    changes
        .iter()
        .map(|c| c["state"].as_str().unwrap_or("<none>"))
        .collect()
}

#[test]
fn http_tcp_and_command_checks_change_state_after_the_threshold_and_back() -> anyhow::Result<()> {
    let dir = TestDir::new("health-checks")?;
    let cloud = Mosquitto::start(&dir)?;
    let sub = Subscriber::spawn(
        &dir,
        "cloud",
        &SubscriberSpec::new(cloud.port(), &format!("outpost/{NODE}/#")),
    )?;

    let http_port = free_port()?;
    let mut web = StatusHttpServer::spawn(&dir, "web", http_port, 200)?;
    let mut plc = TcpAcceptor::start(free_port()?)?;
    let flag = dir.join("ok");

    let mut cfg = GatewayConfig::new(&dir, NODE, Some(cloud.port()))?;
    cfg.extra = [
        check_toml(
            "web",
            &format!(
                "kind = \"http\"\nurl = \"http://127.0.0.1:{http_port}/health\"\nexpected_status = 200\n"
            ),
        ),
        check_toml(
            "plc",
            &format!("kind = \"tcp\"\naddress = \"127.0.0.1:{}\"\n", plc.port()),
        ),
        check_toml(
            "spool",
            &format!(
                "kind = \"command\"\ncommand = [\"test\", \"-f\", {:?}]\n",
                flag.display().to_string()
            ),
        ),
    ]
    .concat();
    let hp = cfg.health_port;
    let mut gw = Outpost::start(&dir, &cfg)?;

    // Phase 1: web and plc answer, the flag file does not exist.
    let s = wait_states(
        hp,
        &[
            ("web", "healthy"),
            ("plc", "healthy"),
            ("spool", "unhealthy"),
        ],
    )?;
    let spool = check_status(&s, "spool").cloned().unwrap_or_default();
    assert_eq!(spool["kind"], "command", "{spool}");
    assert!(
        spool["consecutive_failures"].as_u64() >= Some(2),
        "unhealthy after failure_threshold failures: {spool}"
    );
    assert_eq!(
        check_status(&s, "web").map(|c| c["kind"].clone()),
        Some("http".into())
    );
    assert_eq!(
        check_status(&s, "plc").map(|c| c["kind"].clone()),
        Some("tcp".into())
    );
    assert_metric_state(hp, "web", "healthy")?;
    assert_metric_state(hp, "plc", "healthy")?;
    assert_metric_state(hp, "spool", "unhealthy")?;
    assert!(
        web.requests()
            .iter()
            .any(|r| r.contains("GET /health -> 200 ua=outpost/")),
        "the HTTP server saw the check's GETs: {:?}",
        web.requests()
    );
    assert!(plc.accepted() > 0, "the TCP check connected");

    // Phase 2: the service answers 500, the port closes, the file appears.
    web.set_status(500)?;
    plc.stop();
    std::fs::write(&flag, b"")?;
    let s = wait_states(
        hp,
        &[
            ("web", "unhealthy"),
            ("plc", "unhealthy"),
            ("spool", "healthy"),
        ],
    )?;
    let web_st = check_status(&s, "web").cloned().unwrap_or_default();
    assert!(
        web_st["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("500")),
        "the HTTP check's error names the status: {web_st}"
    );
    let plc_st = check_status(&s, "plc").cloned().unwrap_or_default();
    assert!(plc_st["last_error"].is_string(), "{plc_st}");
    assert_metric_state(hp, "web", "unhealthy")?;
    assert_metric_state(hp, "plc", "unhealthy")?;
    assert_metric_state(hp, "spool", "healthy")?;

    // Phase 3: both come back.
    web.set_status(200)?;
    plc.restart()?;
    wait_states(hp, &[("web", "healthy"), ("plc", "healthy")])?;
    assert_metric_state(hp, "web", "healthy")?;
    assert_metric_state(hp, "plc", "healthy")?;

    // Phase 4: the HTTP server goes away altogether (connection refused).
    web.kill()?;
    let s = wait_states(hp, &[("web", "unhealthy")])?;
    assert!(
        check_status(&s, "web").is_some_and(|c| c["last_error"].is_string()),
        "{s}"
    );
    assert_metric_state(hp, "web", "unhealthy")?;

    // Every change arrived upstream, in order, with the counts behind it.
    let want_web = [
        "healthy",
        "degraded",
        "unhealthy",
        "healthy",
        "degraded",
        "unhealthy",
    ];
    let want_plc = ["healthy", "degraded", "unhealthy", "healthy"];
    let want_spool = ["degraded", "unhealthy", "healthy"];
    let (web_up, plc_up, spool_up) = wait_for("every check change upstream", WAIT, || {
        let w = upstream_changes(&sub, "web").ok()?;
        let p = upstream_changes(&sub, "plc").ok()?;
        let c = upstream_changes(&sub, "spool").ok()?;
        (w.len() >= want_web.len() && p.len() >= want_plc.len() && c.len() >= want_spool.len())
            .then_some((w, p, c))
    })
    .map_err(|e| {
        e.context(format!(
            "received so far: web {:?} plc {:?} spool {:?}",
            upstream_changes(&sub, "web").map(|v| states(&v).join(",")),
            upstream_changes(&sub, "plc").map(|v| states(&v).join(",")),
            upstream_changes(&sub, "spool").map(|v| states(&v).join(",")),
        ))
    })?;
    assert_eq!(
        states(&web_up),
        want_web,
        "web changes upstream: {web_up:#?}"
    );
    assert_eq!(
        states(&plc_up),
        want_plc,
        "plc changes upstream: {plc_up:#?}"
    );
    assert_eq!(
        states(&spool_up),
        want_spool,
        "spool changes upstream: {spool_up:#?}"
    );
    for (name, changes) in [("web", &web_up), ("plc", &plc_up), ("spool", &spool_up)] {
        for c in changes {
            assert_eq!(c["name"], name, "{c}");
            let (fails, oks) = (
                c["consecutive_failures"].as_u64(),
                c["consecutive_successes"].as_u64(),
            );
            match c["state"].as_str() {
                // The threshold is what moved it: 1 failure is degraded, 2 unhealthy, 2
                // successes after a failure healthy again (1 from unknown/healthy).
                Some("degraded") => assert_eq!(fails, Some(1), "{c}"),
                Some("unhealthy") => {
                    assert_eq!(fails, Some(2), "{c}");
                    assert!(c["last_error"].is_string(), "{c}");
                }
                Some("healthy") => assert!(oks == Some(1) || oks == Some(2), "{c}"),
                other => panic!("unexpected state {other:?} upstream: {c}"),
            }
        }
        // Recoveries (healthy after a failure state) needed recovery_threshold successes.
        for w in changes.windows(2) {
            if w[1]["state"] == "healthy" {
                assert_eq!(
                    w[1]["consecutive_successes"], 2,
                    "recovery of {name}: {}",
                    w[1]
                );
            }
        }
    }
    // Stored as records: they carry the sync's seq user property.
    let msgs = sub.messages()?;
    let check_msgs: Vec<_> = msgs
        .iter()
        .filter(|m| {
            m.topic
                .starts_with(&format!("outpost/{NODE}/$gateway/checks/"))
        })
        .collect();
    assert!(
        check_msgs
            .iter()
            .all(|m| m.props.contains_key("seq") && m.qos == 1),
        "check changes are stored records sent at QoS 1: {check_msgs:?}"
    );
    gw.check_alive()?;
    Ok(())
}
