//! Throwaway PostgreSQL clusters for tests, started from the installed
//! binaries (`initdb`, `pg_ctl`): found on PATH, else in `pg_config
//! --bindir`, else in `/usr/lib/postgresql/*/bin`. The server listens only
//! on a unix socket in a temp dir. `initdb` and `postgres` refuse to run as
//! root, so as root the data dir is chowned to the `postgres` user (created
//! if missing) and the binaries run through `runuser -u postgres --`.
//!
//! `shared()` starts one cluster per test process (in the `it` binary,
//! `store_postgres` and `workers` share it); each test takes its own
//! database from it (`fresh_database`). A watchdog process stops the cluster
//! and removes its dir when the test binary exits (statics are never
//! dropped), and `Drop` does the same for a cluster owned by one test.
//!
//! `PgCluster::start_tls` starts an owned cluster that also listens on TCP
//! loopback with `ssl=on` and a given certificate, for TLS tests.
//!
//! Without PostgreSQL binaries the tests are skipped with a line on stderr,
//! unless `CI_REQUIRE_POSTGRES=1` (set by CI), which makes that a
//! failure. (Not a `COURIER_*` name: `courier serve` reads every
//! `COURIER_*` variable as a config override.)

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// Set to `1` to make missing PostgreSQL binaries a test failure.
pub const REQUIRE_ENV: &str = "CI_REQUIRE_POSTGRES";

/// A running throwaway cluster.
pub struct PgCluster {
    /// The temp dir: `data/` and the unix socket live here.
    dir: PathBuf,
    bindir: PathBuf,
    as_root: bool,
    /// Whether `Drop` stops the cluster (false for the shared one, whose
    /// watchdog does it).
    stop_on_drop: bool,
    /// Server options beyond the unix socket (TCP and TLS for `start_tls`).
    extra_options: String,
}

/// What `start_tls` puts into a cluster.
struct TlsFiles {
    cert_pem: String,
    key_pem: String,
    port: u16,
}

static SHARED: OnceLock<Option<PgCluster>> = OnceLock::new();
static NEXT_DB: AtomicU32 = AtomicU32::new(0);

/// The cluster shared by the tests of this binary, or `None` (after saying
/// so on stderr) when PostgreSQL is not installed.
pub fn shared() -> Option<&'static PgCluster> {
    SHARED
        .get_or_init(|| PgCluster::start_with("shared", false))
        .as_ref()
}

/// Set to a directory to use only the PostgreSQL binaries there (and to
/// check the skip path: point it at an empty directory).
pub const BINDIR_ENV: &str = "PG_TEST_BINDIR";

/// The directory holding `initdb` and `pg_ctl`, if PostgreSQL is installed.
pub fn find_bindir() -> Option<PathBuf> {
    let has_tools = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    if let Some(dir) = std::env::var_os(BINDIR_ENV) {
        let dir = PathBuf::from(dir);
        return has_tools(&dir).then_some(dir);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if has_tools(&dir) {
                return Some(dir);
            }
        }
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if has_tools(&dir) {
            return Some(dir);
        }
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path().join("bin")))
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    versions.into_iter().rev().find(|d| has_tools(d))
}

/// Says that PostgreSQL tests are skipped, or fails when CI requires them.
fn missing(what: &str) {
    if std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1") {
        panic!("{REQUIRE_ENV}=1 but {what}");
    }
    // Straight to the process's stderr (the test harness captures
    // `eprintln!`), once per test binary.
    static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !SAID.swap(true, Ordering::Relaxed) {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: PostgreSQL tests ({what}; set {REQUIRE_ENV}=1 to make this an error)"
        );
    }
}

fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn run(cmd: &mut Command, what: &str) {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl PgCluster {
    /// Starts a cluster owned by the caller (stopped on drop), or `None`
    /// when PostgreSQL is not installed.
    pub fn start() -> Option<PgCluster> {
        Self::start_with("owned", true)
    }

    /// Starts a cluster owned by the caller that also listens on TCP
    /// 127.0.0.1 (the port returned) with `ssl=on` and this certificate and
    /// key (PEM), or `None` when PostgreSQL is not installed.
    pub fn start_tls(cert_pem: &str, key_pem: &str) -> Option<(PgCluster, u16)> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let tls = TlsFiles {
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            port,
        };
        Self::start_full("tls", true, Some(tls)).map(|c| (c, port))
    }

    fn start_with(label: &str, stop_on_drop: bool) -> Option<PgCluster> {
        Self::start_full(label, stop_on_drop, None)
    }

    fn start_full(label: &str, stop_on_drop: bool, tls: Option<TlsFiles>) -> Option<PgCluster> {
        let Some(bindir) = find_bindir() else {
            match std::env::var(BINDIR_ENV) {
                Ok(dir) => missing(&format!("{BINDIR_ENV}={dir} holds no initdb/pg_ctl")),
                Err(_) => missing(
                    "initdb/pg_ctl were not found on PATH, in pg_config --bindir or /usr/lib/postgresql",
                ),
            }
            return None;
        };
        let as_root = running_as_root();
        if as_root {
            let known = Command::new("id")
                .args(["-u", "postgres"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !known {
                run(
                    Command::new("useradd").args(["--system", "--no-create-home", "postgres"]),
                    "useradd postgres",
                );
            }
        }
        let dir = tempfile::Builder::new()
            .prefix(&format!("courier-pg-{label}-"))
            .tempdir()
            .expect("temp dir for postgres")
            .keep();
        let mut extra_options = String::new();
        if let Some(tls) = &tls {
            use std::os::unix::fs::PermissionsExt;
            let (cert, key) = (dir.join("server.crt"), dir.join("server.key"));
            std::fs::write(&cert, &tls.cert_pem).expect("server cert written");
            std::fs::write(&key, &tls.key_pem).expect("server key written");
            // The server refuses a key others can read.
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))
                .expect("key mode");
            extra_options = format!(
                " -c listen_addresses=127.0.0.1 -p {} -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                tls.port,
                cert.display(),
                key.display()
            );
        }
        if as_root {
            run(
                Command::new("chown").args(["-R", "postgres:"]).arg(&dir),
                "chown the cluster dir",
            );
        }
        let cluster = PgCluster {
            dir,
            bindir,
            as_root,
            stop_on_drop,
            extra_options,
        };
        run(
            cluster
                .tool("initdb")
                .args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"])
                .args(["--locale=C", "-D"])
                .arg(cluster.data_dir()),
            "initdb",
        );
        cluster.spawn_watchdog();
        cluster.start_server();
        Some(cluster)
    }

    /// A command running one of the PostgreSQL binaries as a non-root user.
    fn tool(&self, name: &str) -> Command {
        let path = self.bindir.join(name);
        if self.as_root {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "postgres", "--"]).arg(path);
            cmd
        } else {
            Command::new(path)
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Starts (or restarts) the server and waits until it accepts connections.
    pub fn start_server(&self) {
        let mut options = format!(
            "-c listen_addresses='' -k {} -c fsync=on -c max_connections=200 \
             -c shared_buffers=32MB",
            self.dir.display()
        );
        // Later settings win: TCP and TLS for a `start_tls` cluster.
        options.push_str(&self.extra_options);
        run(
            self.tool("pg_ctl")
                .args(["-w", "-t", "60", "-D"])
                .arg(self.data_dir())
                .arg("-l")
                .arg(self.dir.join("server.log"))
                .args(["-o", &options, "start"]),
            "pg_ctl start",
        );
    }

    /// Stops the server the way a crash would (no shutdown checkpoint; the
    /// next start runs crash recovery).
    pub fn crash_server(&self) {
        run(
            self.tool("pg_ctl").args(["-D"]).arg(self.data_dir()).args([
                "-m",
                "immediate",
                "-w",
                "stop",
            ]),
            "pg_ctl stop -m immediate",
        );
    }

    /// Stops the cluster and removes its dir when this process exits,
    /// however it exits.
    fn spawn_watchdog(&self) {
        let pg_ctl = self.bindir.join("pg_ctl");
        let stop = if self.as_root {
            format!(
                "runuser -u postgres -- {} -D {} -m immediate stop",
                pg_ctl.display(),
                self.data_dir().display()
            )
        } else {
            format!(
                "{} -D {} -m immediate stop",
                pg_ctl.display(),
                self.data_dir().display()
            )
        };
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; {stop} >/dev/null 2>&1; rm -rf {dir}",
            pid = std::process::id(),
            dir = self.dir.display()
        );
        // Detached (the outer shell exits at once), so nothing to reap.
        let detached = format!("( {script} ) </dev/null >/dev/null 2>&1 &");
        let status = Command::new("sh")
            .args(["-c", &detached])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("spawn the postgres watchdog");
        assert!(status.success(), "starting the postgres watchdog failed");
    }

    /// A libpq-style connection string for `dbname`.
    pub fn conninfo(&self, dbname: &str) -> String {
        format!("host={} user=postgres dbname={dbname}", self.dir.display())
    }

    /// Creates an empty database and returns its connection string.
    pub async fn fresh_database(&self) -> String {
        let name = format!(
            "t{}_{}",
            std::process::id(),
            NEXT_DB.fetch_add(1, Ordering::Relaxed)
        );
        let (client, connection) =
            tokio_postgres::connect(&self.conninfo("postgres"), tokio_postgres::NoTls)
                .await
                .expect("connect to the postgres database");
        let driver = tokio::spawn(connection);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create database");
        drop(client);
        let _ = driver.await;
        self.conninfo(&name)
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if self.stop_on_drop {
            let _ = self
                .tool("pg_ctl")
                .args(["-D"])
                .arg(self.data_dir())
                .args(["-m", "immediate", "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
