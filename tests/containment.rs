//! Containment: every process of a worker's tree ends with its worker and with the primary,
//! and a terminal's signals reach only the primary. The programs are in `tests/programs/` and
//! the Node.js example (`examples/node-worker/app.js`).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::*;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

const T: Duration = Duration::from_secs(30);

fn program(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/programs")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

fn serve(opts: &[&str], command: &[&str]) -> (Running, SocketAddr) {
    let mut cmd = Command::new(netcluster_bin());
    cmd.arg("serve").args(opts).arg("--").args(command);
    let mut r = Running::from_command(cmd);
    let addr = listening_addr(&mut r);
    (r, addr)
}

/// Every live process whose environment says it belongs to a worker tree of primary `primary`.
fn tree_processes(primary: u32) -> Vec<u32> {
    let marker = format!("NETCLUSTER_TREE={primary}:");
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rfind(')')
                    .map(|i| s[i + 1..].trim_start().starts_with('Z'))
            })
            .unwrap_or(true);
        if zombie {
            continue;
        }
        let ours = std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| {
            env.split(|&b| b == 0)
                .any(|v| v.starts_with(marker.as_bytes()))
        });
        if ours {
            out.push(pid);
        }
    }
    out
}

/// Whether a connection to `addr` is refused (not accepted, not left unanswered).
fn refused(addr: SocketAddr) -> bool {
    matches!(
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

/// One `GET path` with `Connection: close`: the whole answer.
fn get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(15)))?;
    // In one write: the test programs read the request with one recv.
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

#[test]
fn a_daemonizing_program_leaves_nothing_behind_its_restarts_or_the_stop() {
    let (r, addr) = serve(
        &[
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "2",
            "--ready-after",
            "0",
        ],
        &["python3", &program("daemonize.py")],
    );
    // Each start forks a setsid child and exits: the slots restart, and each time the child
    // the worker left behind is killed.
    eventually(T, "three restarts", || {
        let s = status(&r);
        (s.slots.iter().map(|s| s.restarts).sum::<u32>() >= 3).then_some(())
    });
    let at_most = eventually_or(Duration::from_secs(3), || {
        let n = tree_processes(r.pid).len();
        (n <= 2).then_some(n)
    });
    assert!(
        at_most.is_some(),
        "children of workers that exited are left: {:?}",
        tree_processes(r.pid)
    );
    let (status, out, err) = ctl(&r, &["stop"]);
    assert!(status.success(), "{out}{err}");
    eventually(
        Duration::from_secs(5),
        "no process of any worker tree",
        || tree_processes(r.pid).is_empty().then_some(()),
    );
    assert!(
        refused(addr),
        "the port still takes connections after the stop"
    );
}

#[test]
fn the_primarys_sigkill_ends_every_tree_and_frees_the_port() {
    let drain = 2;
    let drain_arg = drain.to_string();
    let opts = [
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--drain-timeout",
        drain_arg.as_str(),
    ];
    let mut py_opts = opts.to_vec();
    py_opts.extend(["--ready-after", "0"]);
    let (python, py_addr) = serve(&py_opts, &["python3", &program("grandchild.py")]);
    let (node, node_addr) = serve(&opts, &["node", &node_app()]);
    wait_listening(&python, 2);
    wait_listening(&node, 2);
    eventually(T, "2 workers and their children", || {
        (tree_processes(python.pid).len() >= 4).then_some(())
    });
    for (addr, path) in [(py_addr, "/"), (node_addr, "/")] {
        assert!(get(addr, path).expect("served").contains("hello"));
    }
    for r in [&python, &node] {
        r.signal(Signal::SIGKILL);
    }
    let limit = Duration::from_secs(drain + 1);
    for (r, addr) in [(&python, py_addr), (&node, node_addr)] {
        eventually(
            limit,
            "every tree to end within the drain timeout + 1 s",
            || tree_processes(r.pid).is_empty().then_some(()),
        );
        assert!(
            refused(addr),
            "{addr} is not refused after the primary's death"
        );
    }
    // Nothing of theirs is left: the notification sockets' directory and the cgroups go
    // with them (their guardian removes them), so a test run leaves no file behind.
    for r in [&python, &node] {
        let notify = format!("netcluster-notify-{}-", r.pid);
        let cgroup = format!("netcluster-{}", r.pid);
        eventually(
            Duration::from_secs(5),
            "the primary's files to be removed",
            || {
                let tmp_left = std::fs::read_dir(std::env::temp_dir())
                    .expect("temp dir")
                    .flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with(&notify));
                let cgroup_left = std::fs::read_to_string("/proc/self/mountinfo")
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| l.contains(" - cgroup2 "))
                    .filter_map(|l| l.split_whitespace().nth(4))
                    .any(|mount| std::path::Path::new(mount).join(&cgroup).exists());
                (!tmp_left && !cgroup_left).then_some(())
            },
        );
    }
    // A new primary on the same port gets every request.
    let port = py_addr.port().to_string();
    let listen = format!("127.0.0.1:{port}");
    let (again, addr) = serve(
        &["--listen", &listen, "--workers", "2", "--ready-after", "0"],
        &["python3", &program("grandchild.py")],
    );
    wait_listening(&again, 2);
    for i in 0..50 {
        let answer = get(addr, "/").unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert!(answer.starts_with("HTTP/1.1 200"), "request {i}: {answer}");
    }
}

#[test]
fn ctrl_c_to_the_group_finishes_the_request_in_flight_and_stops_gracefully() {
    let (mut r, addr) = serve(
        &["--listen", "127.0.0.1:0", "--workers", "2"],
        &["node", &node_app()],
    );
    wait_listening(&r, 2);
    let in_flight = std::thread::spawn(move || get(addr, "/slow?ms=1500"));
    std::thread::sleep(Duration::from_millis(400));
    // What a terminal does on Ctrl-C: SIGINT to the whole foreground process group.
    killpg(Pid::from_raw(r.pid as i32), Signal::SIGINT).expect("killpg");
    let answer = in_flight
        .join()
        .expect("client")
        .expect("the request in flight");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(r.wait_exit(T).success(), "{:?}", r.stderr_seen);
    assert!(
        !r.stderr_seen.iter().any(|l| l.contains("unexpectedly")),
        "{:?}",
        r.stderr_seen
    );
}

#[test]
fn sighup_to_the_group_loses_no_connection() {
    let (r, addr) = serve(
        &["--listen", "127.0.0.1:0", "--workers", "2"],
        &["node", &node_app()],
    );
    wait_listening(&r, 2);
    let load = HttpLoad::start(addr, 2, 2, Duration::from_millis(5));
    load.wait_for_more(50, T);
    // What a terminal does when it closes: SIGHUP to the foreground process group. Only the
    // primary gets it, and it reloads.
    killpg(Pid::from_raw(r.pid as i32), Signal::SIGHUP).expect("killpg");
    eventually(T, "a reload to generation 2", || {
        let s = status(&r);
        (s.generation == 2 && s.reload.is_none() && s.workers.len() == 2).then_some(())
    });
    load.wait_for_more(50, T);
    let report = load.stop();
    assert_eq!(report.failed, 0, "{:?}", report.errors);
}
