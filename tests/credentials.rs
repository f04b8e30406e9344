//! Containment (issue 18): what workers get and who they run as.
//!
//! - Listeners reach a program **blocking**, as systemd passes them: the README's Python
//!   snippet with a plain accept loop serves.
//! - A native worker's listeners are close-on-exec before any of its code runs: a program it
//!   starts holds no listening socket.
//! - `--user USER[:GROUP]` runs the workers as USER (uid, gid, groups, no new privileges) while
//!   the primary binds a port below 1024 and keeps its control socket; an unknown user exits 2
//!   before anything is bound; `--rlimit-nofile N` is the workers' descriptor limit.
//!
//! The `--user` tests need root (CI runs the tests as root); as another user they say so and
//! return.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(30);

/// `nobody`'s ids.
const NOBODY: u32 = 65534;

/// The README's Python snippet, as written there: the block after "Running your own program".
fn readme_python_snippet() -> String {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("read README.md");
    let section = readme
        .split("## Running your own program")
        .nth(1)
        .expect("the README has a \"Running your own program\" section");
    let block = section
        .split("```python\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("a ```python block in that section");
    block.to_string()
}

/// A directory everyone may enter and read (a temp dir is 0700).
fn open_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    dir
}

/// Whether a user other than the owner may reach and execute `path`: every directory above
/// it searchable by others, the file executable by them.
fn executable_by_others(path: &Path) -> bool {
    let file_ok = std::fs::metadata(path).is_ok_and(|m| m.mode() & 0o001 != 0);
    file_ok
        && path
            .ancestors()
            .skip(1)
            .filter(|a| !a.as_os_str().is_empty())
            .all(|a| std::fs::metadata(a).is_ok_and(|m| m.mode() & 0o001 != 0))
}

/// The netcluster binary where `nobody` can execute it: where it was built if every directory
/// above it is searchable, else a copy in `dir` (a 0755 directory), since CI may build under a
/// directory only root can enter.
fn binary_for_nobody(dir: &Path) -> PathBuf {
    let built = netcluster_bin();
    if executable_by_others(&built) {
        return built;
    }
    let copy = copy_binary(dir);
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    copy
}

/// Whether this test process can start workers as another user.
fn root_or_skip(test: &str) -> bool {
    let root = nix::unistd::Uid::effective().is_root();
    if !root {
        eprintln!("{test}: skipped: only root can run workers as another user");
    }
    root
}

/// A TCP port below 1024 that nothing listens on at 127.0.0.1 now.
fn free_privileged_port() -> u16 {
    (900..1024)
        .rev()
        .find(|&p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
        .expect("a free port below 1024 on 127.0.0.1")
}

/// A field of `/proc/PID/status` (`Uid`, `Gid`, `NoNewPrivs`, …), as its words.
fn proc_status(pid: u32, field: &str) -> Vec<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// `app.py` in `dir`: the README's snippet as the README writes it, with the plain blocking
/// accept loop its comment stands for (echo: `hello\r\n`, then the line back). On a
/// non-blocking fd 3 its first accept with no connection waiting raises `BlockingIOError`.
fn write_readme_app(dir: &Path) {
    let snippet = readme_python_snippet();
    assert!(snippet.contains("socket.socket(fileno=3)"), "{snippet}");
    let app = format!(
        "{snippet}\
         while True:\n\
         \x20   conn, _ = listener.accept()\n\
         \x20   with conn:\n\
         \x20       conn.sendall(b\"hello\\r\\n\")\n\
         \x20       data = b\"\"\n\
         \x20       while not data.endswith(b\"\\n\"):\n\
         \x20           chunk = conn.recv(4096)\n\
         \x20           if not chunk:\n\
         \x20               break\n\
         \x20           data += chunk\n\
         \x20       conn.sendall(data)\n"
    );
    std::fs::write(dir.join("app.py"), app).expect("write app.py");
}

#[test]
fn the_readmes_python_snippet_serves_a_hundred_requests() {
    let dir = tempfile::tempdir().expect("temp dir");
    write_readme_app(dir.path());
    // The README's command line, on port 0.
    let mut cmd = Command::new(netcluster_bin());
    cmd.current_dir(dir.path()).args([
        "serve",
        "--workers",
        "2",
        "--listen",
        "web=127.0.0.1:0",
        "--ready-after",
        "1",
        "--",
        "python3",
        "app.py",
    ]);
    let mut r = Running::from_command(cmd);
    let addr = listening_addr(&mut r);
    r.wait_stderr(T, |l| l.contains("2 workers ready"));
    for i in 0..100 {
        echo_request(addr, &format!("request {i}\n"))
            .unwrap_or_else(|e| panic!("request {i}: {e}\nstderr: {:#?}", r.drain_stderr()));
    }
    let s = status(&r);
    assert_eq!(s.workers.len(), 2, "{s:#?}");
    assert!(
        s.workers.iter().all(|w| w.restarts == 0),
        "a worker crashed: {s:#?}\nstderr: {:#?}",
        r.drain_stderr()
    );
}

#[test]
fn an_upgrade_leaves_the_old_program_workers_sockets_blocking() {
    // The new primary takes the sockets over while the old one's workers still accept on
    // them: it must not make them non-blocking under their feet.
    for policy in ["shared", "reuseport"] {
        let dir = tempfile::tempdir().expect("temp dir");
        write_readme_app(dir.path());
        let mut cmd = Command::new(copy_binary(dir.path()));
        cmd.current_dir(dir.path()).args([
            "serve",
            "--workers",
            "2",
            "--listen",
            "127.0.0.1:0",
            "--policy",
            policy,
            "--ready-after",
            "0.5",
            "--drain-timeout",
            "2",
            "--",
            "python3",
            "app.py",
        ]);
        let mut r = Running::from_command(cmd);
        let addr = listening_addr(&mut r);
        r.wait_stderr(T, |l| l.contains("2 workers ready"));
        let load = Load::echo(addr, 2, Duration::from_millis(5));
        load.wait_for_more(50, T);
        for i in 0..2 {
            let (status, out, err) = ctl(&r, &["upgrade"]);
            assert!(status.success(), "{policy}: upgrade {i}: {out}{err}");
            load.wait_for_more(50, T);
        }
        // The app does not handle SIGTERM (the README leaves it to a comment), so a connection
        // it holds when an old worker is stopped may be cut: failures are not counted here.
        let report = load.stop();
        let stderr = r.drain_stderr().join("\n");
        assert!(
            !stderr.contains("BlockingIOError"),
            "{policy}: a worker's accept found its socket non-blocking:\n{stderr}"
        );
        assert!(report.ok >= 150, "{policy}: {report:?}");
    }
}

/// The sockets of process `pid` that lack `O_CLOEXEC` in `/proc/PID/fdinfo`, by descriptor
/// number. (Not every descriptor: what the test harness leaks into the primary, a jobserver's
/// pipe, passes on to its workers like any inherited descriptor.)
fn inheritable_sockets(pid: u32) -> Vec<(u32, String)> {
    fd_table(pid)
        .into_iter()
        .filter(|(fd, target)| *fd > 2 && target.starts_with("socket:"))
        .filter(|(fd, _)| {
            let info =
                std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap_or_default();
            let flags = info
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .and_then(|f| u32::from_str_radix(f.trim(), 8).ok());
            // Closed since it was listed: nothing to inherit.
            flags.is_some_and(|f| f & 0o2_000_000 == 0)
        })
        .collect()
}

#[test]
fn a_native_workers_listeners_are_close_on_exec_under_shared_and_reuseport() {
    for policy in ["shared", "reuseport"] {
        let mut r = Running::start(
            &netcluster_bin(),
            &[
                "serve",
                "--workers",
                "1",
                "--listen",
                "127.0.0.1:0",
                "--policy",
                policy,
            ],
        );
        let addr = listening_addr(&mut r);
        r.wait_stderr(T, |l| l.contains("1 workers ready"));
        echo_request(addr, "serving\n").expect("a request");
        let s = status(&r);
        let worker = s.workers.first().expect("a worker").pid;
        let table = fd_table(worker);
        assert!(
            table.get(&3).is_some_and(|t| t.starts_with("socket:")),
            "{policy}: the worker holds its listener at fd 3: {table:?}"
        );
        let leaky = inheritable_sockets(worker);
        assert!(
            leaky.is_empty(),
            "{policy}: descriptors a program the worker starts would inherit: {leaky:?}"
        );
    }
}

#[test]
fn a_program_a_native_worker_starts_holds_no_listening_socket() {
    // cluster_probe as a native worker of `netcluster serve`: before it touches the cluster
    // API it starts a child that lists its descriptors.
    let probe = example_bin("cluster_probe");
    let probe = probe.to_string_lossy();
    let mut r = Running::start(
        &netcluster_bin(),
        &[
            "serve",
            "--workers",
            "1",
            "--listen",
            "127.0.0.1:0",
            "--policy",
            "shared",
            "--native",
            "--",
            &probe,
            "--child-fds",
        ],
    );
    let addr = listening_addr(&mut r);
    let line = r.wait_stdout(T, |l| l.starts_with("worker-child-fds"));
    let common::probe::Line::WorkerChildFds { child, .. } = probe_line(&line) else {
        panic!("not a worker-child-fds line: {line}");
    };
    let listening: Vec<String> = tcp_listeners(addr.port())
        .into_iter()
        .map(|ino| format!("socket:[{ino}]"))
        .collect();
    assert!(!listening.is_empty(), "the primary listens on {addr}");
    let held: Vec<_> = child
        .iter()
        .filter(|(_, target)| listening.contains(target))
        .collect();
    assert!(
        held.is_empty(),
        "the worker's child holds the listening socket: {held:?} (all: {child:?})"
    );
    // The child saw its stdio, so the listing is real.
    assert!(child.contains_key(&0), "{child:?}");
}

#[test]
fn workers_run_as_nobody_while_the_primary_binds_a_port_below_1024() {
    if !root_or_skip("workers_run_as_nobody_while_the_primary_binds_a_port_below_1024") {
        return;
    }
    let dir = open_dir();
    let bin = binary_for_nobody(dir.path());
    let port = free_privileged_port();
    let listen = format!("127.0.0.1:{port}");
    let mut cmd = Command::new(&bin);
    cmd.current_dir(dir.path()).args([
        "serve",
        "--workers",
        "2",
        "--listen",
        &listen,
        "--user",
        "nobody",
    ]);
    let mut r = Running::from_command(cmd);
    let addr = listening_addr(&mut r);
    assert_eq!(addr.port(), port);
    r.wait_stderr(T, |l| l.contains("2 workers ready"));
    for i in 0..20 {
        echo_request(addr, &format!("as nobody {i}\n")).expect("served");
    }
    let s = status(&r);
    assert_eq!(s.workers.len(), 2, "{s:#?}");
    for w in &s.workers {
        let uid = proc_status(w.pid, "Uid");
        assert!(
            uid.iter().all(|u| *u == NOBODY.to_string()),
            "worker {} Uid {uid:?}",
            w.pid
        );
        let gid = proc_status(w.pid, "Gid");
        assert!(
            gid.iter().all(|g| *g == NOBODY.to_string()),
            "worker {} Gid {gid:?}",
            w.pid
        );
        assert_eq!(proc_status(w.pid, "NoNewPrivs"), ["1"], "worker {}", w.pid);
    }
    // The primary and its control socket stay root's.
    assert_eq!(proc_status(r.pid, "Uid")[0], "0");
    let control = std::fs::metadata(r.control()).expect("the control socket");
    assert_eq!(control.uid(), 0);
}

#[test]
fn a_program_worker_run_as_nobody_says_ready_on_its_notify_socket() {
    if !root_or_skip("a_program_worker_run_as_nobody_says_ready_on_its_notify_socket") {
        return;
    }
    let dir = open_dir();
    let bin = binary_for_nobody(dir.path());
    let script = dir.path().join("w.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\nsystemd-notify --ready --status=\"uid $(id -u)\" || exit 1\nexec sleep 3600\n",
    )
    .expect("write the script");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let mut cmd = Command::new(&bin);
    cmd.current_dir(dir.path())
        .args([
            "serve",
            "--workers",
            "2",
            "--listen",
            "127.0.0.1:0",
            "--ready-timeout",
            "20",
            "--user",
            "nobody",
            "--",
            "sh",
        ])
        .arg(&script);
    let mut r = Running::from_command(cmd);
    listening_addr(&mut r);
    r.wait_stderr(T, |l| l.contains("2 workers ready"));
    let s = status(&r);
    for w in &s.workers {
        assert_eq!(w.status_text.as_deref(), Some("uid 65534"), "{s:#?}");
    }
}

#[test]
fn an_unknown_user_or_group_exits_2_naming_it_before_anything_is_bound() {
    for (spec, named) in [
        ("no-such-user", "no-such-user"),
        ("nobody:no-such-group", "no-such-group"),
    ] {
        let mut r = Running::start(
            &netcluster_bin(),
            &["serve", "--listen", "127.0.0.1:0", "--user", spec],
        );
        let status = r.wait_exit(T);
        let err = r.stderr_seen.join("\n");
        assert_eq!(status.code(), Some(2), "{spec}: {err}");
        assert!(err.contains(named), "{spec}: {err}");
        assert!(
            !r.stdout_seen.iter().any(|l| l.starts_with("listening on")),
            "{spec}: {:?}",
            r.stdout_seen
        );
        assert!(
            !r.control().exists(),
            "{spec}: the control socket was bound"
        );
    }
}

#[test]
fn rlimit_nofile_is_the_workers_descriptor_limit() {
    let mut r = Running::start(
        &netcluster_bin(),
        &[
            "serve",
            "--workers",
            "1",
            "--listen",
            "127.0.0.1:0",
            "--rlimit-nofile",
            "512",
        ],
    );
    let addr = listening_addr(&mut r);
    r.wait_stderr(T, |l| l.contains("1 workers ready"));
    echo_request(addr, "limited\n").expect("served");
    let worker = status(&r).workers.first().expect("a worker").pid;
    let limits = std::fs::read_to_string(format!("/proc/{worker}/limits")).expect("limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files");
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(words[3..5], ["512", "512"], "{line}");
    // The primary's own is untouched.
    let own = std::fs::read_to_string(format!("/proc/{}/limits", r.pid)).expect("limits");
    assert!(
        !own.lines()
            .any(|l| l.starts_with("Max open files") && l.split_whitespace().nth(3) == Some("512")),
        "{own}"
    );
}
