//! Named instances and the operator's view of them (issue 19): two primaries side by side by
//! name, `netcluster ls`, a client that finds its primary when their environments differ and
//! trusts no other user's socket, a control directory closed to others, silent clients that
//! cannot lock out `status`, and the version and commit of what runs.
//!
//! Tests of names give each command a private `XDG_RUNTIME_DIR` and no `NETCLUSTER_CONTROL`.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;
use netcluster::cluster::Status;

const T: Duration = Duration::from_secs(30);

/// A runtime directory of the test's own (`XDG_RUNTIME_DIR`), mode 0700 as a real one is.
fn runtime_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).expect("chmod");
    dir
}

/// `netcluster ARGS` with `XDG_RUNTIME_DIR` set to `xdg` (or cleared) and no
/// `NETCLUSTER_CONTROL`.
fn netcluster(xdg: Option<&Path>, args: &[&str]) -> Command {
    let mut cmd = Command::new(netcluster_bin());
    cmd.args(args).env_remove("NETCLUSTER_CONTROL");
    match xdg {
        Some(dir) => cmd.env("XDG_RUNTIME_DIR", dir),
        None => cmd.env_remove("XDG_RUNTIME_DIR"),
    };
    cmd
}

/// Runs `netcluster ARGS` as [`netcluster`] to completion.
fn run(xdg: Option<&Path>, args: &[&str]) -> Output {
    netcluster(xdg, args).output().expect("run netcluster")
}

/// Runs a `netcluster serve` expected to fail at start (killed after [`T`] otherwise): its
/// exit status and stderr.
fn serve_to_end(xdg: Option<&Path>, args: &[&str]) -> (std::process::ExitStatus, String) {
    let mut r = Running::from_command(netcluster(xdg, args));
    let status = r.wait_exit(T);
    (status, r.stderr_seen.join("\n"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `status --json --name NAME`, once the primary answers with `n` workers listening.
fn wait_status(xdg: Option<&Path>, name: &str, n: usize) -> Status {
    eventually(T, "the named primary's workers", || {
        let out = run(xdg, &["status", "--json", "--name", name]);
        if !out.status.success() {
            return None;
        }
        let s: Status = serde_json::from_slice(&out.stdout).expect("status JSON");
        (s.workers.iter().filter(|w| w.state == "listening").count() == n).then_some(s)
    })
}

/// A primary named `name` with one worker on a free port.
fn serve_named(xdg: Option<&Path>, name: &str) -> Running {
    let cmd = netcluster(
        xdg,
        &[
            "serve",
            "--name",
            name,
            "--workers",
            "1",
            "--listen",
            "127.0.0.1:0",
        ],
    );
    let mut r = Running::from_command(cmd);
    listening_addr(&mut r);
    r
}

/// A name no other test (or earlier run) uses, for sockets in shared directories.
fn unique_name(what: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("t-{what}-{}-{nanos}", std::process::id())
}

/// Removes a socket file a killed primary left in a shared directory.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn two_named_primaries_run_side_by_side_and_ls_shows_both() {
    let xdg = runtime_dir();
    let x = Some(xdg.path());
    let a = serve_named(x, "alpha");
    let b = serve_named(x, "beta");
    let sa = wait_status(x, "alpha", 1);
    let sb = wait_status(x, "beta", 1);
    assert_eq!((sa.pid, sb.pid), (a.pid, b.pid));
    let dir = xdg.path().join("netcluster");
    assert!(dir.join("alpha.sock").exists() && dir.join("beta.sock").exists());

    // The same name twice: the second says why, and how to give it another.
    let (ok, err) = serve_to_end(x, &["serve", "--name", "alpha", "--listen", "127.0.0.1:0"]);
    assert!(!ok.success());
    assert!(
        err.contains("another primary answers on it") && err.contains("--name"),
        "{err}"
    );

    // ls: both, as a table and as JSON.
    let out = run(x, &["ls"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    for (name, pid) in [("alpha", a.pid), ("beta", b.pid)] {
        assert!(
            table
                .lines()
                .any(|l| l.starts_with(name) && l.contains(&pid.to_string()) && l.contains("1/1")),
            "{table}"
        );
    }
    let out = run(x, &["ls", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ls JSON");
    let primaries = json["primaries"].as_array().expect("primaries");
    for (name, pid, status) in [("alpha", a.pid, &sa), ("beta", b.pid, &sb)] {
        let p = primaries
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("{name} not in {json:#}"));
        assert_eq!(p["pid"], pid, "{p:#}");
        assert_eq!(p["workers_ready"], 1, "{p:#}");
        assert_eq!(p["workers_wanted"], 1, "{p:#}");
        assert_eq!(p["generation"], 1, "{p:#}");
        assert_eq!(p["policy"], "round-robin", "{p:#}");
        assert_eq!(p["version"], env!("CARGO_PKG_VERSION"), "{p:#}");
        assert_eq!(p["commit"], netcluster::cluster::COMMIT, "{p:#}");
        assert_eq!(
            p["listeners"][0].as_str(),
            Some(status.listeners[0].address.as_str())
        );
    }

    // A primary that died leaves a stale socket: skipped, and said so.
    drop(a);
    assert!(dir.join("alpha.sock").exists(), "SIGKILL leaves the socket");
    let out = run(x, &["ls"]);
    let table = text(&out.stdout);
    assert!(!table.lines().any(|l| l.starts_with("alpha")), "{table}");
    assert!(table.contains("stale socket"), "{table}");
    let out = run(x, &["ls", "-v"]);
    let table = text(&out.stdout);
    assert!(
        table.contains(&format!("stale: {}", dir.join("alpha.sock").display())),
        "{table}"
    );
    let out = run(x, &["ls", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ls JSON");
    assert!(
        json["skipped"]
            .as_array()
            .expect("skipped")
            .iter()
            .any(|s| s["name"] == "alpha" && s["stale"] == true),
        "{json:#}"
    );
    // Control commands take the name.
    let out = run(x, &["stop", "--name", "beta"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut b = b;
    b.wait_exit(T);
}

#[test]
fn a_client_finds_a_primary_whose_environment_differs() {
    // systemd-socket-activate clears XDG_RUNTIME_DIR: the primary (root here) puts its socket
    // in /run/netcluster, and a client with a runtime directory still finds it.
    let name = unique_name("env");
    let _cleanup = RemoveOnDrop(PathBuf::from(format!("/run/netcluster/{name}.sock")));
    let r = serve_named(None, &name);
    let xdg = runtime_dir();
    let s = wait_status(Some(xdg.path()), &name, 1);
    assert_eq!(s.pid, r.pid);
    let out = run(Some(xdg.path()), &["ls"]);
    assert!(
        text(&out.stdout).lines().any(|l| l.starts_with(&name)),
        "{}",
        text(&out.stdout)
    );

    // None runs: the client says where it looked.
    let missing = unique_name("none");
    let out = run(Some(xdg.path()), &["status", "--name", &missing]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    let uid = nix::unistd::geteuid();
    for place in [
        xdg.path()
            .join("netcluster")
            .join(format!("{missing}.sock")),
        PathBuf::from(format!("/run/user/{uid}/netcluster/{missing}.sock")),
        PathBuf::from(format!("/run/netcluster/{missing}.sock")),
        PathBuf::from(format!("/tmp/netcluster-{uid}/{missing}.sock")),
    ] {
        assert!(
            err.contains(&place.display().to_string()),
            "{place:?} in {err}"
        );
    }
    assert!(
        err.contains(&format!("no primary named {missing:?}")),
        "{err}"
    );
}

/// The environment variable that makes [`fake_control_server`] run.
const FAKE_ENV: &str = "NETCLUSTER_TEST_FAKE_CONTROL";

/// Not a test: a fake control server that [`a_socket_served_by_another_user_is_refused`] runs
/// as `nobody` (this test binary again, under `setpriv`). It listens at `$FAKE_ENV`, prints
/// `ready`, and answers every request with "stopped", printing what it got.
#[test]
#[ignore = "a helper run by another test"]
fn fake_control_server() {
    let Some(path) = std::env::var_os(FAKE_ENV) else {
        return;
    };
    let listener = UnixListener::bind(&path).expect("bind the fake socket");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    println!("ready");
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let mut line = String::new();
        let _ = BufReader::new(&stream).read_line(&mut line);
        if !line.is_empty() {
            println!("got: {}", line.trim_end());
        }
        let _ = stream.write_all(
            b"{\"version\":2,\"ok\":true,\"reply\":\"stopped\",\"result\":{\"workers_exited\":7}}\n",
        );
    }
}

#[test]
fn a_socket_served_by_another_user_is_refused() {
    // Another user who can write to the control directory puts a socket of its own where the
    // client looks. The client must refuse it before saying anything.
    let xdg = tempfile::tempdir().expect("temp dir");
    std::fs::set_permissions(xdg.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let dir = xdg.path().join("netcluster");
    std::fs::create_dir(&dir).expect("mkdir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let sock = dir.join("victim.sock");
    let mut fake = Command::new("setpriv");
    fake.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(std::env::current_exe().expect("this test binary"))
        .args([
            "--exact",
            "fake_control_server",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(FAKE_ENV, &sock);
    let mut fake = Running::from_command(fake);
    fake.wait_stdout(T, |l| l.ends_with("ready"));

    for args in [
        vec!["stop", "--name", "victim"],
        vec!["stop", "--control", sock.to_str().expect("utf-8")],
    ] {
        let out = run(Some(xdg.path()), &args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(!text(&out.stdout).contains("stopped"), "{args:?}");
        assert!(
            err.contains("refusing the control socket") && err.contains("uid 65534"),
            "{args:?}: {err}"
        );
    }
    // ls names it and shows no primary.
    let out = run(Some(xdg.path()), &["ls"]);
    let table = text(&out.stdout);
    assert!(!table.lines().any(|l| l.starts_with("victim")), "{table}");
    assert!(
        table.contains(&format!("skipped {}", sock.display())) && table.contains("uid 65534"),
        "{table}"
    );
    // Nothing was sent to it.
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !fake.stdout_seen.iter().any(|l| l.contains("got:")),
        "{:?}",
        fake.stdout_seen
    );
}

#[test]
fn permission_denied_names_the_primarys_user() {
    let dir = tempfile::tempdir().expect("temp dir");
    // Others may reach the directory (not write it): the socket's own mode refuses them.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let control = dir.path().join("c.sock");
    let mut cmd = Command::new(netcluster_bin());
    cmd.args([
        "serve",
        "--workers",
        "1",
        "--listen",
        "127.0.0.1:0",
        "--control",
    ])
    .arg(&control)
    .env("NETCLUSTER_CONTROL", &control);
    let mut r = Running::from_command(cmd);
    listening_addr(&mut r);
    eventually(T, "the primary", || try_status_at(&control));
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(netcluster_bin())
        .args(["status", "--control"])
        .arg(&control)
        .output()
        .expect("setpriv (util-linux)");
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("Permission denied"), "{err}");
    assert!(
        err.contains("uid 0 (root)") && err.contains("run the command as the primary's user"),
        "{err}"
    );
}

#[test]
fn the_primary_refuses_a_control_directory_others_can_write_to() {
    let dir = tempfile::tempdir().expect("temp dir");
    let open = dir.path().join("open");
    std::fs::create_dir(&open).expect("mkdir");
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let control = open.join("c.sock");
    let (status, _, err) = run_to_end(
        &netcluster_bin(),
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--control",
            control.to_str().expect("utf-8"),
        ],
        T,
    );
    assert!(!status.success(), "{err}");
    assert!(
        err.contains(&format!("{} is mode 0777", open.display())),
        "{err}"
    );
    assert!(!control.exists());
    // By name too: a runtime directory whose netcluster/ others can write to.
    let xdg = runtime_dir();
    let nc = xdg.path().join("netcluster");
    std::fs::create_dir(&nc).expect("mkdir");
    std::fs::set_permissions(&nc, std::fs::Permissions::from_mode(0o775)).expect("chmod");
    let (ok, err) = serve_to_end(
        Some(xdg.path()),
        &["serve", "--name", "x", "--listen", "127.0.0.1:0"],
    );
    assert!(!ok.success());
    assert!(
        err.contains(&format!("{} is mode 0775", nc.display())),
        "{err}"
    );
}

/// `status` of `r`'s primary, and how long it took.
fn timed_status(r: &Running) -> (Status, Duration) {
    let t = Instant::now();
    let s = status(r);
    (s, t.elapsed())
}

#[test]
fn fifty_silent_clients_do_not_hold_up_status() {
    let mut r = Running::start(
        &netcluster_bin(),
        &["serve", "--workers", "1", "--listen", "127.0.0.1:0"],
    );
    listening_addr(&mut r);
    wait_listening(&r, 1);
    let connect = || {
        let s = UnixStream::connect(r.control()).expect("connect");
        s.set_read_timeout(Some(T)).expect("timeout");
        s
    };
    let mut silent: Vec<UnixStream> = (0..50).map(|_| connect()).collect();
    let (s, took) = timed_status(&r);
    assert_eq!(s.workers.len(), 1);
    assert!(took < Duration::from_secs(1), "status took {took:?}");

    // More than the primary holds: the oldest silent ones make room, and are told why.
    silent.extend((0..100).map(|_| connect()));
    let (_, took) = timed_status(&r);
    assert!(took < Duration::from_secs(1), "status took {took:?}");
    let mut first = String::new();
    silent[0].read_to_string(&mut first).expect("read");
    assert!(first.contains("had not sent its request"), "{first}");
    // The primary holds what it says: at most its cap of connections, not 150.
    let fds = fd_count(r.pid);
    assert!(fds < 120, "the primary holds {fds} descriptors");
    drop(silent);
    assert_eq!(status(&r).workers_wanted, 1);
}

#[test]
fn version_and_commit_are_shown() {
    let commit = netcluster::cluster::COMMIT;
    assert!(!commit.is_empty());
    let out = Command::new(netcluster_bin())
        .arg("--version")
        .output()
        .expect("run");
    assert!(out.status.success());
    assert_eq!(
        text(&out.stdout).trim(),
        format!("netcluster {} (commit {commit})", env!("CARGO_PKG_VERSION"))
    );
    // Built in a git checkout (as the tests are), the commit is HEAD's.
    if let Ok(head) = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
    {
        if head.status.success() {
            assert_eq!(commit, text(&head.stdout).trim());
        }
    }

    let mut r = Running::start(
        &netcluster_bin(),
        &["serve", "--workers", "1", "--listen", "127.0.0.1:0"],
    );
    listening_addr(&mut r);
    let s = wait_listening(&r, 1);
    assert_eq!(s.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(s.commit, commit);
    let (ok, table, err) = ctl(&r, &["status"]);
    assert!(ok.success(), "{err}");
    let first = table.lines().next().unwrap_or_default();
    assert!(
        first.contains(&format!(
            "(netcluster {}, commit {commit})",
            env!("CARGO_PKG_VERSION")
        )),
        "{first}"
    );
}
