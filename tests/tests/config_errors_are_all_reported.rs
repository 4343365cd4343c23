//! `outpost check-config` reports every problem of a file, each as `  <path>: <message>` on
//! stderr, and exits 64; the output of `print-default-config` passes `check-config`.

use outpost_tests::{TestDir, outpost_command};

#[test]
fn three_errors_are_all_reported_with_their_paths() -> anyhow::Result<()> {
    let dir = TestDir::new("config-errors")?;
    let file = dir.join("bad.toml");
    std::fs::write(
        &file,
        r#"
[node]
name = "gw1"

[storage]
quota = "lots"
when_full = "explode"

[upstream]
url = "http://127.0.0.1:1883"
"#,
    )?;
    let out = outpost_command()?.arg("check-config").arg(&file).output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(64),
        "check-config must exit 64; stderr:\n{stderr}"
    );
    for path in ["storage.quota", "storage.when_full", "upstream.url"] {
        assert!(
            stderr
                .lines()
                .any(|l| l.starts_with(&format!("  {path}: ")) && l.len() > path.len() + 4),
            "no `  {path}: <message>` line on stderr:\n{stderr}"
        );
    }
    Ok(())
}

#[test]
fn unknown_key_is_refused_with_exit_64() -> anyhow::Result<()> {
    let dir = TestDir::new("config-unknown")?;
    let file = dir.join("unknown.toml");
    std::fs::write(&file, "[storage]\ncolour = \"red\"\n")?;
    let out = outpost_command()?.arg("check-config").arg(&file).output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "stderr:\n{stderr}");
    assert!(
        stderr.contains("colour"),
        "the unknown key is named:\n{stderr}"
    );
    Ok(())
}

#[test]
fn default_config_passes_check_config() -> anyhow::Result<()> {
    let dir = TestDir::new("config-default")?;
    let out = outpost_command()?.arg("print-default-config").output()?;
    assert!(
        out.status.success(),
        "print-default-config failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.stdout.is_empty(),
        "print-default-config printed nothing"
    );
    let file = dir.join("default.toml");
    std::fs::write(&file, &out.stdout)?;
    let check = outpost_command()?.arg("check-config").arg(&file).output()?;
    assert!(
        check.status.success(),
        "the default configuration fails check-config ({}):\n{}",
        check.status,
        String::from_utf8_lossy(&check.stderr)
    );
    Ok(())
}
