//! Primary upgrades: `netcluster upgrade` (and `SIGUSR2`) replace the primary with the binary on
//! disk without closing a listening socket.
//!
//! Under a steady mixed HTTP load (new connections and keep-alive requests, counted one by one)
//! the test performs 5 upgrades with a reload after each, for every policy, with the built-in
//! app and with a Node.js program: 0 requests refused, reset, failed or timed out; the
//! primary's pid changes each time; the port stays; the last primary holds as many descriptors
//! as the first. A binary that fails at once, or never answers, leaves the old primary
//! serving. 120 listeners with long names cross over. A hand-over that is truncated or
//! malformed is refused by the new primary, which says so and exits.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(60);
const UPGRADES: usize = 5;

fn upgrade_under_load(args: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let bin = copy_binary(dir.path());
    let mut all = vec![
        "serve",
        "--workers",
        "2",
        "--listen",
        "127.0.0.1:0",
        "--drain-timeout",
        "10",
    ];
    all.extend_from_slice(args);
    let mut r = Running::start(&bin, &all);
    let addr = listening_addr(&mut r);
    wait_listening(&r, 2);
    let first = r.pid;
    // Idle to idle: under round robin the primary holds the connections it is handing off.
    let fds_first = settled_fd_count(first);
    let table_first = fd_table(first);
    let load = HttpLoad::start(addr, 3, 3, Duration::from_millis(2));
    load.wait_for_more(100, T);
    let mut pids = vec![first];
    for i in 0..UPGRADES {
        let (status, out, err) = ctl(&r, &["upgrade"]);
        assert!(status.success(), "upgrade {i}: {out}{err}");
        let now = wait_listening(&r, 2);
        let pid = now.pid;
        assert!(
            !pids.contains(&pid),
            "upgrade {i}: a new primary, not {pids:?}"
        );
        assert!(out.contains(&format!("→ {pid}")), "{out}");
        assert_eq!(now.listeners[0].address, addr.to_string(), "the port stays");
        pids.push(pid);
        load.wait_for_more(20, T);
        let (status, out, err) = ctl(&r, &["reload"]);
        assert!(status.success(), "reload after upgrade {i}: {out}{err}");
        load.wait_for_more(20, T);
    }
    let report = load.stop();
    eprintln!(
        "{args:?}: {UPGRADES} upgrades and reloads, {} requests served, {} failed; primaries {pids:?}",
        report.ok, report.failed
    );
    assert_eq!(report.failed, 0, "{args:?}: {report:?}");
    assert!(report.ok > 500, "{report:?}");
    // The old primaries are gone once their workers drained.
    for &old in &pids[..pids.len() - 1] {
        eventually(T, "an old primary to exit", || {
            (!alive(old) || is_zombie(old)).then_some(())
        });
    }
    let last = *pids.last().unwrap();
    let settled = eventually_or(Duration::from_secs(20), || {
        let n = fd_count(last);
        (n == fds_first).then_some(n)
    });
    assert!(
        settled.is_some(),
        "the last primary ({last}, {} fds) holds other descriptors than the first ({first}, {fds_first} fds):\nfirst: {table_first:?}\nlast: {:?}",
        fd_count(last),
        fd_table(last)
    );
    assert_eq!(
        status(&r).generation,
        1 + 2 * UPGRADES as u64,
        "each upgrade and each reload is a generation"
    );
}

/// Whether `pid` has exited but not been reaped (its parent, an old primary, is gone: the
/// sandbox's init may be slow to reap).
fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

#[test]
fn round_robin_upgrades_fail_no_request() {
    upgrade_under_load(&["--app", "http", "--policy", "round-robin"]);
}

#[test]
fn shared_upgrades_fail_no_request() {
    upgrade_under_load(&["--app", "http", "--policy", "shared"]);
}

#[test]
fn reuseport_upgrades_fail_no_request() {
    upgrade_under_load(&["--app", "http", "--policy", "reuseport"]);
}

#[test]
fn node_program_upgrades_fail_no_request() {
    upgrade_under_load(&["--policy", "reuseport", "--", "node", &node_app()]);
}

#[test]
fn a_binary_that_fails_leaves_the_old_primary_serving() {
    let dir = tempfile::tempdir().unwrap();
    let bin = copy_binary(dir.path());
    let good = std::fs::read(&bin).unwrap();
    let mut r = Running::start(
        &bin,
        &[
            "serve",
            "--workers",
            "2",
            "--listen",
            "127.0.0.1:0",
            "--app",
            "http",
        ],
    );
    let addr = listening_addr(&mut r);
    wait_listening(&r, 2);
    let load = HttpLoad::start(addr, 2, 2, Duration::from_millis(2));
    load.wait_for_more(50, T);
    // A binary that exits at once.
    install_over(&bin, b"#!/bin/sh\necho broken >&2\nexit 1\n");
    let (status, out, err) = ctl(&r, &["upgrade"]);
    assert!(!status.success(), "{out}");
    assert!(err.contains("upgrade failed"), "{err}");
    assert!(err.contains("exit status: 1"), "{err}");
    assert!(err.contains("this primary serves on"), "{err}");
    assert_eq!(primary_pid(&r), r.pid);
    load.wait_for_more(50, T);
    // One that never speaks the hand-over.
    install_over(&bin, b"#!/bin/sh\nexec sleep 600\n");
    let (status, _, err) = ctl(&r, &["upgrade"]);
    assert!(!status.success());
    assert!(err.contains("did not answer"), "{err}");
    assert_eq!(primary_pid(&r), r.pid);
    load.wait_for_more(50, T);
    // The right one.
    install_over(&bin, &good);
    let (status, out, err) = ctl(&r, &["upgrade"]);
    assert!(status.success(), "{out}{err}");
    assert_ne!(primary_pid(&r), r.pid);
    load.wait_for_more(50, T);
    let report = load.stop();
    assert_eq!(report.failed, 0, "{report:?}");
}

#[test]
fn sigusr2_upgrades_too() {
    let dir = tempfile::tempdir().unwrap();
    let bin = copy_binary(dir.path());
    let mut r = Running::start(
        &bin,
        &["serve", "--workers", "1", "--listen", "127.0.0.1:0"],
    );
    let addr = listening_addr(&mut r);
    wait_listening(&r, 1);
    r.signal(nix::sys::signal::Signal::SIGUSR2);
    let pid = eventually(T, "a new primary", || {
        let s = status(&r);
        (s.pid != r.pid && s.workers.len() == 1).then_some(s.pid)
    });
    assert_ne!(pid, r.pid);
    echo_request(addr, "after SIGUSR2").unwrap();
}

#[test]
fn a_hundred_and_twenty_listeners_with_long_names_cross_over() {
    let dir = tempfile::tempdir().unwrap();
    let bin = copy_binary(dir.path());
    let n = 120;
    let names: Vec<String> = (0..n)
        .map(|i| format!("listener-{i:03}-{}", "n".repeat(200)))
        .collect();
    let mut args: Vec<String> = vec!["serve".into(), "--workers".into(), "1".into()];
    for name in &names {
        args.push("--listen".into());
        args.push(format!("{name}=127.0.0.1:0"));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut r = Running::start(&bin, &args);
    let mut addrs = Vec::new();
    for _ in 0..n {
        let line = r.wait_stdout(T, |l| l.starts_with("listening on "));
        addrs.push(
            line.trim_start_matches("listening on ")
                .parse::<std::net::SocketAddr>()
                .unwrap(),
        );
    }
    wait_listening(&r, 1);
    let fds_first = settled_fd_count(r.pid);
    let (status, out, err) = ctl(&r, &["upgrade"]);
    assert!(status.success(), "{out}{err}");
    assert!(
        out.contains(&format!("{n} listeners ({n} sockets)")),
        "{out}"
    );
    let s = wait_listening(&r, 1);
    let pid = s.pid;
    assert_ne!(pid, r.pid);
    assert_eq!(s.listeners.len(), n);
    for (i, l) in s.listeners.iter().enumerate() {
        assert_eq!(l.name, names[i]);
        assert_eq!(l.address, addrs[i].to_string());
    }
    for addr in &addrs {
        echo_request(*addr, "crossed over").unwrap();
    }
    let fds_last = eventually(T, "the new primary's descriptors to settle", || {
        let n = fd_count(pid);
        (n == fds_first).then_some(n)
    });
    assert_eq!(fds_last, fds_first);
}

/// The test stands in for the old primary: it starts `netcluster serve` with the hand-over's
/// other end at descriptor 3, sends `frames`, and returns what came back and how the process
/// ended.
async fn fake_old_primary(
    send: impl AsyncFnOnce(&netcluster::protocol::Channel),
) -> (
    Vec<netcluster::protocol::handover::Handover>,
    std::process::ExitStatus,
    String,
) {
    use command_fds::{CommandFdExt, FdMapping};
    use netcluster::protocol::handover::{Handover, UPGRADE_FD_ENV};
    let (ours, theirs) = netcluster::protocol::channel::seqpacket_pair().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new(netcluster_bin());
    cmd.args(["serve", "--workers", "1", "--listen", "127.0.0.1:0"])
        .env(UPGRADE_FD_ENV, "3")
        .env("NETCLUSTER_CONTROL", dir.path().join("control.sock"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    cmd.fd_mappings(vec![FdMapping {
        parent_fd: theirs,
        child_fd: 3,
    }])
    .unwrap();
    let mut child = cmd.spawn().unwrap();
    drop(cmd);
    let channel = netcluster::protocol::Channel::from_fd(ours).unwrap();
    send(&channel).await;
    let mut back = Vec::new();
    while let Ok(Ok(Some((msg, _)))) =
        tokio::time::timeout(Duration::from_secs(20), channel.recv::<Handover>()).await
    {
        back.push(msg);
    }
    let status = tokio::task::spawn_blocking(move || {
        let status = child.wait().unwrap();
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        (status, err)
    })
    .await
    .unwrap();
    (back, status.0, status.1)
}

fn test_listener() -> (std::net::TcpListener, std::net::SocketAddr) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

fn meta(addr: std::net::SocketAddr, sockets: u32) -> netcluster::protocol::handover::Handover {
    netcluster::protocol::handover::Handover::Listener {
        index: 0,
        info: netcluster::cluster::ListenerInfo {
            target: netcluster::protocol::message::ListenTarget::Tcp(addr),
            ordinal: 0,
            name: Some("web".into()),
            fdname: Some("web".into()),
            pinned: true,
            owned: true,
            reuseport: false,
        },
        sockets,
    }
}

fn hello(listeners: u32) -> netcluster::protocol::handover::Handover {
    netcluster::protocol::handover::Handover::Hello {
        pid: std::process::id(),
        generation: 1,
        workers: 1,
        listeners,
    }
}

#[tokio::test]
async fn a_truncated_hand_over_is_refused_and_the_sockets_stay_the_old_primarys() {
    use netcluster::protocol::handover::Handover;
    use std::os::fd::AsFd;
    let (listener, addr) = test_listener();
    // Two listeners announced, one sent, then the old primary "dies".
    let (back, status, err) = fake_old_primary(async |ch| {
        ch.send(&hello(2), &[]).await.unwrap();
        ch.send(&meta(addr, 1), &[]).await.unwrap();
        ch.send(
            &Handover::Socket {
                listener: 0,
                slot: None,
            },
            &[listener.as_fd()],
        )
        .await
        .unwrap();
        // Its end of the hand-over closes (replies can still come back).
        nix::sys::socket::shutdown(
            std::os::fd::AsRawFd::as_raw_fd(&ch.as_fd()),
            nix::sys::socket::Shutdown::Write,
        )
        .unwrap();
    })
    .await;
    assert!(!back.contains(&Handover::Received), "{back:?}");
    assert!(!status.success(), "{err}");
    assert!(err.contains("closed the hand-over before Done"), "{err}");
    // The socket is as it was: it listens and queues a connection.
    std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
    let (_conn, _) = listener.accept().unwrap();
}

#[tokio::test]
async fn a_short_listener_and_a_malformed_frame_are_refused_with_a_reason() {
    use netcluster::protocol::handover::Handover;
    let (listener, addr) = test_listener();
    // A listener that announces a socket and Done before it came.
    let (back, status, err) = fake_old_primary(async |ch| {
        ch.send(&hello(1), &[]).await.unwrap();
        ch.send(&meta(addr, 1), &[]).await.unwrap();
        ch.send(
            &Handover::Done {
                listeners: 1,
                sockets: 0,
            },
            &[],
        )
        .await
        .unwrap();
    })
    .await;
    let reason = back
        .iter()
        .find_map(|m| match m {
            Handover::Failed { reason } => Some(reason.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("a Failed reply: {back:?}\n{err}"));
    assert!(reason.contains("got 0 of its 1 sockets"), "{reason}");
    assert!(!status.success());
    // Garbage.
    let (back, status, err) = fake_old_primary(async |ch| {
        ch.send_raw(&[1, 0xff, 0xff, 0xff], &[]).await.unwrap();
    })
    .await;
    let reason = back
        .iter()
        .find_map(|m| match m {
            Handover::Failed { reason } => Some(reason.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("a Failed reply: {back:?}\n{err}"));
    assert!(reason.contains("Handover"), "{reason}");
    assert!(!status.success());
    std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
    drop(listener);
}

/// `netcluster` found through a symlink on `PATH`, switched to a new version: the upgrade
/// starts the new version, not the old target.
#[test]
fn an_upgrade_runs_what_the_path_the_user_invoked_now_names() {
    let dir = tempfile::tempdir().unwrap();
    let v1 = dir.path().join("v1");
    let v2 = dir.path().join("v2");
    let bin = dir.path().join("bin");
    for d in [&v1, &v2, &bin] {
        std::fs::create_dir(d).unwrap();
    }
    let old = copy_binary(&v1);
    let new = copy_binary(&v2);
    let link = bin.join("netcluster");
    std::os::unix::fs::symlink(&old, &link).unwrap();
    let mut path = std::ffi::OsString::from(bin.as_os_str());
    path.push(":");
    path.push(std::env::var_os("PATH").unwrap_or_default());
    let mut cmd = std::process::Command::new("netcluster");
    cmd.env("PATH", &path)
        .args(["serve", "--workers", "1", "--listen", "127.0.0.1:0"]);
    let mut r = Running::from_command(cmd);
    let _addr = listening_addr(&mut r);
    wait_listening(&r, 1);
    // The install switches the link.
    std::fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink(&new, &link).unwrap();
    let (status, out, err) = ctl(&r, &["upgrade"]);
    assert!(status.success(), "{out}{err}");
    let now = wait_listening(&r, 1);
    assert_ne!(now.pid, r.pid);
    let exe = std::fs::read_link(format!("/proc/{}/exe", now.pid)).unwrap();
    assert_eq!(
        exe, new,
        "the new primary runs the binary the link names now"
    );
}
