//! Program workers' output through the primary: a primary whose stdout and stderr nobody reads
//! keeps answering and counts what it drops; a primary whose output is read passes every line
//! whole and prefixed.

mod common;

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

const T: Duration = Duration::from_secs(30);

/// A primary in its own process group whose stdout and stderr go to one pipe that nobody
/// reads (the read end is held, so writes block rather than fail). Killed on drop.
struct Unread {
    child: Child,
    _read_end: std::os::fd::OwnedFd,
    control: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Unread {
    fn start(args: &[&str]) -> Unread {
        let dir = tempfile::tempdir().expect("temp dir");
        let control = dir.path().join("control.sock");
        let (read_end, write_end) = nix::unistd::pipe().expect("pipe");
        let err_end = write_end.try_clone().expect("dup the pipe");
        let child = Command::new(netcluster_bin())
            .args(args)
            .env("NETCLUSTER_CONTROL", &control)
            .env("NETCLUSTER_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::from(write_end))
            .stderr(Stdio::from(err_end))
            .process_group(0)
            .spawn()
            .expect("start the primary");
        Unread {
            child,
            _read_end: read_end,
            control,
            _dir: dir,
        }
    }
}

impl Drop for Unread {
    fn drop(&mut self) {
        let _ = killpg(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

#[test]
fn a_flooding_worker_and_an_unread_output_do_not_stop_the_primary() {
    let mut p = Unread::start(&[
        "serve",
        "--workers",
        "1",
        "--listen",
        "127.0.0.1:0",
        "--ready-after",
        "0",
        "--",
        "sh",
        "-c",
        "exec yes flood",
    ]);
    let control = p.control.clone();
    let first = eventually(T, "the primary to answer", || try_status_at(&control));
    assert_eq!(first.workers.len(), 1, "{first:?}");
    // The pipe fills (64 KiB), then the primary's queue (1 MiB): lines are dropped.
    let dropped = eventually(T, "dropped lines to be counted", || {
        let s = try_status_at(&control)?;
        (s.output_dropped_lines > 0).then_some(s)
    });
    assert_eq!(
        dropped.workers[0].output_dropped_lines, dropped.output_dropped_lines,
        "the one worker's count is the total: {dropped:?}"
    );
    // While the worker goes on flooding an output nobody reads, the primary answers at once,
    // again and again, and its count goes on growing.
    let mut last = dropped.output_dropped_lines;
    for round in 0..5 {
        std::thread::sleep(Duration::from_millis(200));
        let asked = Instant::now();
        let s = try_status_at(&control).expect("the primary answers");
        let took = asked.elapsed();
        assert!(
            took < Duration::from_secs(1),
            "status took {took:?} in round {round}"
        );
        assert!(s.output_dropped_lines >= last, "{s:?}");
        last = s.output_dropped_lines;
        let human = Command::new(netcluster_bin())
            .args(["status", "--control"])
            .arg(&control)
            .output()
            .expect("status");
        assert!(
            String::from_utf8_lossy(&human.stdout).contains("output dropped"),
            "{}",
            String::from_utf8_lossy(&human.stdout)
        );
    }
    assert!(last > dropped.output_dropped_lines, "the count grows");
    // It also stops: its last log lines cannot be written, and that does not hold it up.
    let stop = Command::new(netcluster_bin())
        .args(["stop", "--control"])
        .arg(&control)
        .output()
        .expect("stop");
    assert!(
        stop.status.success(),
        "{}",
        String::from_utf8_lossy(&stop.stderr)
    );
    eventually(T, "the primary to exit", || {
        p.child.try_wait().expect("try_wait")
    });
}

/// What worker `slot`'s line `i` says: its slot, its number, and a body of varying length (up
/// to 9 KiB, longer than a pipe's atomic write, so lines arrive cut across reads).
fn expected_line(slot: u32, i: u32) -> String {
    format!(
        "[slot {slot}] line {i} {}",
        "x".repeat((i * 997 % 9000) as usize)
    )
}

const LINES: u32 = 300;
const ERR_LINES: u32 = 20;

#[test]
fn output_that_is_read_arrives_whole_and_prefixed() {
    let script = format!(
        "import sys, time\n\
         for i in range({LINES}):\n    print(f'line {{i}} ' + 'x' * (i * 997 % 9000))\n\
         for i in range({ERR_LINES}):\n    print(f'err {{i}}', file=sys.stderr)\n\
         sys.stdout.flush()\nsys.stderr.flush()\ntime.sleep(600)\n"
    );
    let mut cmd = Command::new(netcluster_bin());
    cmd.args([
        "serve",
        "--workers",
        "2",
        "--listen",
        "127.0.0.1:0",
        "--ready-after",
        "0",
        "--",
        "python3",
        "-c",
        &script,
    ]);
    let mut r = Running::from_command(cmd);
    let expected = 2 * u64::from(LINES + ERR_LINES);
    eventually(T, "every line, shown or counted as dropped", || {
        r.drain_stdout();
        r.drain_stderr();
        let shown = r
            .stdout_seen
            .iter()
            .chain(r.stderr_seen.iter())
            .filter(|l| l.starts_with("[slot "))
            .count() as u64;
        let dropped = try_status_at(&r.control())?.output_dropped_lines;
        (shown + dropped >= expected).then_some(())
    });
    let dropped = status(&r).output_dropped_lines;
    // On a machine this quiet nothing is dropped; the count says so when something is.
    let mut seen = std::collections::BTreeMap::<(u32, u32), u32>::new();
    for line in r.stdout_seen.iter().filter(|l| l.starts_with("[slot ")) {
        let (slot, i) = line
            .strip_prefix("[slot ")
            .and_then(|rest| rest.split_once("] line "))
            .and_then(|(slot, rest)| {
                let i = rest.split_once(' ')?.0;
                Some((slot.parse().ok()?, i.parse().ok()?))
            })
            .unwrap_or_else(|| panic!("not a whole worker line: {:.80}", line));
        assert_eq!(*line, expected_line(slot, i), "line {i} of slot {slot}");
        *seen.entry((slot, i)).or_default() += 1;
    }
    assert!(seen.values().all(|&n| n == 1), "each line once");
    for line in r.stderr_seen.iter().filter(|l| l.starts_with("[slot ")) {
        let ok = line
            .strip_prefix("[slot ")
            .and_then(|rest| rest.split_once("] err "))
            .is_some_and(|(slot, i)| {
                slot.parse::<u32>().is_ok() && i.parse::<u32>().is_ok_and(|i| i < ERR_LINES)
            });
        assert!(ok, "a whole stderr line: {line:.80}");
    }
    let shown = seen.len() as u64
        + r.stderr_seen
            .iter()
            .filter(|l| l.starts_with("[slot "))
            .count() as u64;
    assert_eq!(shown + dropped, expected, "every line shown or counted");
    if dropped == 0 {
        for slot in 1..=2 {
            for i in 0..LINES {
                assert!(seen.contains_key(&(slot, i)), "line {i} of slot {slot}");
            }
        }
    }
}
