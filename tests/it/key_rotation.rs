//! Key rotation without lock-out and the secret rules of `check-config`
//! (issue 18), through the `courier` binary and the server's start-up:
//! `keygen` writes fresh key ids, `keygen --rotate` keeps the old key and
//! lists its public part, a key id known with other material is refused at
//! start-up and by `check-config`, and each configuration problem is printed
//! once.

use std::path::Path;
use std::process::{Command, Output};

use courier::config::Config;
use courier::keys::{KeyError, ServerSigningKey};
use courier::server::{Listeners, ServerError};

use crate::support::relay::repo_root;

fn courier(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_courier"))
        .args(args)
        .env_remove("COURIER_CONFIG")
        .env_remove("COURIER_RPC__SECRET")
        .output()
        .expect("courier runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A complete configuration for `dir`, with `secret` and extra top-level
/// lines (before any section).
fn config_text(dir: &Path, secret: &str, top: &str) -> String {
    let root = repo_root();
    format!(
        r#"server_name = "localhost:1"
signing_key_path = "{dir}/signing.key"
{top}
[federation]
bind = "127.0.0.1:0"
tls_cert = "{root}/certs/localhost.crt"
tls_key = "{root}/certs/localhost.key"
[client]
bind = "127.0.0.1:0"
[rpc]
bind = "127.0.0.1:0"
secret = "{secret}"
[store]
sqlite = "{dir}/courier.db"
"#,
        dir = dir.display(),
        root = root.display(),
    )
}

const SECRET: &str = "key-rotation-test-secret";

#[test]
fn keygen_writes_fresh_synapse_shaped_ids() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut ids = Vec::new();
    for name in ["one.key", "two.key"] {
        let path = dir.path().join(name);
        let out = courier(&["keygen", "--out", path.to_str().expect("utf-8")]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let key = ServerSigningKey::load(&path).expect("a key file");
        let version = key.version().to_owned();
        let suffix = version.strip_prefix("a_").expect("a_ prefix");
        assert_eq!(suffix.len(), 6, "{version}");
        assert!(
            suffix.bytes().all(|b| b.is_ascii_alphanumeric()),
            "{version}"
        );
        assert!(text(&out.stdout).contains(key.key_id()));
        ids.push(version);
    }
    assert_ne!(ids[0], ids[1], "two keygens, two ids");

    // An explicit version still wins; an existing file is never overwritten.
    let path = dir.path().join("fixed.key");
    let out = courier(&[
        "keygen",
        "--out",
        path.to_str().expect("utf-8"),
        "--version",
        "a_1",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let before = std::fs::read_to_string(&path).expect("written");
    assert!(before.starts_with("ed25519 a_1 "));
    let again = courier(&["keygen", "--out", path.to_str().expect("utf-8")]);
    assert_eq!(again.status.code(), Some(2));
    assert!(text(&again.stderr).contains("already exists"));
    assert_eq!(std::fs::read_to_string(&path).expect("kept"), before);
}

#[test]
fn rotate_keeps_the_old_key_and_publishes_its_public_part() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key_path = dir.path().join("signing.key");
    let config_path = dir.path().join("courier.toml");
    std::fs::write(&config_path, config_text(dir.path(), SECRET, "")).expect("config");
    let key = key_path.to_str().expect("utf-8");
    let config = config_path.to_str().expect("utf-8");
    let out = courier(&["keygen", "--out", key, "--version", "a_1"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let old = ServerSigningKey::load(&key_path).expect("old key");

    let out = courier(&["keygen", "--rotate", "--out", key, "--config", config]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let new = ServerSigningKey::load(&key_path).expect("new key");
    assert_ne!(new.key_id(), "ed25519:a_1");
    assert!(stdout.contains(new.key_id()), "{stdout}");
    let kept = ServerSigningKey::load(&dir.path().join("signing.key.old-a_1")).expect("kept");
    assert_eq!(kept.public_key_base64(), old.public_key_base64());

    // The config now publishes the old key, and checks as valid.
    let loaded = Config::load(&config_path).expect("rotated config is valid");
    assert_eq!(loaded.old_verify_keys.len(), 1);
    assert_eq!(loaded.old_verify_keys[0].key_id, "ed25519:a_1");
    assert_eq!(
        loaded.old_verify_keys[0].public_key,
        old.public_key_base64()
    );
    let check = courier(&["check-config", "--config", config]);
    assert!(check.status.success(), "{}", text(&check.stderr));
    assert!(text(&check.stdout).contains(new.key_id()));

    // A second rotation appends a second entry; both stay listed.
    let out = courier(&["keygen", "--rotate", "--out", key, "--config", config]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let loaded = Config::load(&config_path).expect("still valid");
    let ids: Vec<&str> = loaded
        .old_verify_keys
        .iter()
        .map(|k| k.key_id.as_str())
        .collect();
    assert_eq!(ids, ["ed25519:a_1", new.key_id()]);

    // Without --config the entry is printed, and nothing is lost.
    let out = courier(&["keygen", "--rotate", "--out", key]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("[[old_verify_keys]]"));
    let kept_files = std::fs::read_dir(dir.path())
        .expect("list")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().contains(".old-"))
        .count();
    assert_eq!(kept_files, 3);
}

#[test]
fn check_config_prints_each_problem_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config_path = dir.path().join("courier.toml");
    let config = config_path.to_str().expect("utf-8");

    // A missing key file: its OS error once.
    std::fs::write(&config_path, config_text(dir.path(), SECRET, "")).expect("config");
    let out = courier(&["check-config", "--config", config]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("cannot read key file"), "{stderr}");
    assert_eq!(stderr.matches("No such file").count(), 1, "{stderr}");

    // The example's placeholder, and a short secret: one line each.
    let key = dir.path().join("signing.key");
    let out = courier(&["keygen", "--out", key.to_str().expect("utf-8")]);
    assert!(out.status.success());
    for (secret, needle) in [
        ("change-me-please", "placeholder"),
        ("short-secret", "at least 16 bytes"),
    ] {
        std::fs::write(&config_path, config_text(dir.path(), secret, "")).expect("config");
        let out = courier(&["check-config", "--config", config]);
        assert_eq!(out.status.code(), Some(2), "{secret}");
        let stderr = text(&out.stderr);
        assert_eq!(stderr.matches("[rpc] secret").count(), 1, "{stderr}");
        assert!(stderr.contains(needle), "{stderr}");
    }

    // The shipped example fails on its placeholder (and nothing else
    // about the secret).
    let example = repo_root().join("config/courier.example.toml");
    let out = courier(&["check-config", "--config", example.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert_eq!(stderr.matches("placeholder").count(), 1, "{stderr}");

    // A missing config file: its OS error once.
    let missing = dir.path().join("missing.toml");
    let out = courier(&["check-config", "--config", missing.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert_eq!(stderr.matches("No such file").count(), 1, "{stderr}");
}

#[test]
fn serve_prints_a_bind_error_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("signing.key");
    let out = courier(&["keygen", "--out", key.to_str().expect("utf-8")]);
    assert!(out.status.success());
    // Hold a loopback port so that the federation listener cannot bind it.
    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = held.local_addr().expect("addr").port();
    let config = config_text(dir.path(), SECRET, "").replacen(
        "bind = \"127.0.0.1:0\"",
        &format!("bind = \"127.0.0.1:{port}\""),
        1,
    );
    let config_path = dir.path().join("courier.toml");
    std::fs::write(&config_path, config).expect("config");
    let out = courier(&["serve", "--config", config_path.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains(&format!("127.0.0.1:{port}")), "{stderr}");
    assert!(stderr.contains("in use"), "{stderr}");
    assert_eq!(stderr.matches("os error").count(), 1, "{stderr}");
    drop(held);
}

/// An `old_verify_keys` entry with our key's id and other key material.
fn conflicting_entry(key: &ServerSigningKey) -> String {
    let other = ServerSigningKey::generate(key.version());
    format!(
        "[[old_verify_keys]]\nkey_id = \"{}\"\nkey = \"{}\"\nexpired_ts = 1\n",
        key.key_id(),
        other.public_key_base64()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_id_known_with_other_material_is_refused_at_start() {
    courier::tls::install_crypto_provider();
    let dir = tempfile::tempdir().expect("tempdir");
    let key = ServerSigningKey::generate("a_1");
    courier::keys::write_new_key_file(&dir.path().join("signing.key"), &key).expect("key");
    let text_ = config_text(dir.path(), SECRET, &conflicting_entry(&key));
    let config =
        Config::from_toml_str(&text_, "conflict", std::iter::empty()).expect("parses and checks");
    let listeners = Listeners::bind(&config).await.expect("bind");
    let result = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        courier::server::run(
            config,
            listeners,
            tokio_util::sync::CancellationToken::new(),
        ),
    )
    .await
    .expect("refused without serving");
    let Err(ServerError::Key(KeyError::ReusedKeyId { key_id, .. })) = result else {
        panic!("expected a reused key id, got {result:?}");
    };
    assert_eq!(key_id, "ed25519:a_1");

    // check-config says the same.
    let config_path = dir.path().join("courier.toml");
    std::fs::write(&config_path, &text_).expect("config");
    let out = courier(&[
        "check-config",
        "--config",
        config_path.to_str().expect("utf-8"),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("ed25519:a_1"), "{stderr}");
    assert_eq!(stderr.matches("different key").count(), 1, "{stderr}");
}
