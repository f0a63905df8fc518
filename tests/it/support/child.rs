//! Running one test of this binary in a child process: the child is this
//! same test binary (`std::env::current_exe()`), re-executed with
//! `--exact <module>::<test>` and an environment variable telling the test
//! it is the child. The crash tests use it to kill a writer with SIGKILL;
//! `sender_metrics` uses it to be alone in a process, because the metrics
//! recorder is process-wide and every relay in the `it` binary shares it.

use std::fs::File;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The runtime a crash test's parent or child runs its store on: two
/// worker threads, timers and I/O on.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// The name libtest knows a test by, for `--exact`: the test function's
/// module path without the crate name (`store_crash::kill9_…` in the `it`
/// binary). `module_path` is the caller's `module_path!()`.
pub fn exact_test_name(module_path: &str, function: &str) -> String {
    match module_path.split_once("::") {
        Some((_crate_name, module)) => format!("{module}::{function}"),
        None => function.to_owned(),
    }
}

/// A command re-executing this test binary to run exactly `test_name`
/// (from [`exact_test_name`]), on one thread, its output not captured.
pub fn command(test_name: &str) -> Command {
    let exe = std::env::current_exe().expect("test binary path");
    let mut command = Command::new(exe);
    command.args(["--exact", test_name, "--nocapture", "--test-threads=1"]);
    command
}

/// Runs `module_path::function` alone in a child process with `env` set
/// (to `1`), and fails unless the child ran exactly that one test and it
/// passed within `limit`. The child's output is printed on failure.
pub fn run_alone(module_path: &str, function: &str, env: &str, limit: Duration) {
    let test_name = exact_test_name(module_path, function);
    let dir = tempfile::tempdir().expect("temp dir");
    let out_path = dir.path().join("stdout");
    let err_path = dir.path().join("stderr");
    let out = File::create(&out_path).expect("child stdout file");
    let err = File::create(&err_path).expect("child stderr file");
    let mut child = command(&test_name)
        .env(env, "1")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("spawn child");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("poll child") {
            break Some(status);
        }
        if started.elapsed() > limit {
            // Best effort: the child may have exited meanwhile.
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    let ran_one = stdout.contains("running 1 test") && stdout.contains(" 1 passed;");
    if !(status.is_some_and(|s| s.success()) && ran_one) {
        eprintln!("child stdout:\n{stdout}\nchild stderr:\n{stderr}");
        panic!("child run of {test_name} failed: {status:?} (limit {limit:?})");
    }
}
