use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::*;

/// Feeds `chunks` in turn, then ends the stream; what came out.
fn run(chunks: &[&[u8]], max_line: usize) -> (String, u64) {
    let mut lines = Lines::new("[slot 1] ", max_line);
    let mut out = Vec::new();
    let mut n = 0;
    for c in chunks {
        n += lines.feed(c, true, &mut out);
    }
    n += lines.finish(true, &mut out);
    (String::from_utf8(out).expect("utf-8"), n)
}

#[test]
fn lines_are_prefixed_and_counted() {
    let (out, n) = run(&[b"one\ntwo\n\nthree\n"], 100);
    assert_eq!(
        out,
        "[slot 1] one\n[slot 1] two\n[slot 1] \n[slot 1] three\n"
    );
    assert_eq!(n, 4);
}

#[test]
fn a_line_across_chunks_comes_out_whole() {
    let (out, n) = run(&[b"al", b"pha\nbe", b"", b"t", b"a\ngam", b"ma\n"], 100);
    assert_eq!(out, "[slot 1] alpha\n[slot 1] beta\n[slot 1] gamma\n");
    assert_eq!(n, 3);
}

#[test]
fn every_split_of_a_stream_gives_the_same_lines() {
    let text = b"first line\nsecond\n\nthe fourth one is longer than the rest\nlast";
    let whole = run(&[text], 16);
    for at in 0..=text.len() {
        for at2 in at..=text.len() {
            let split = run(&[&text[..at], &text[at..at2], &text[at2..]], 16);
            assert_eq!(split, whole, "split at {at} and {at2}");
        }
    }
}

#[test]
fn the_unfinished_last_line_gets_a_newline() {
    let (out, n) = run(&[b"done\nno newline"], 100);
    assert_eq!(out, "[slot 1] done\n[slot 1] no newline\n");
    assert_eq!(n, 2);
    assert_eq!(run(&[b""], 100), (String::new(), 0));
}

#[test]
fn long_lines_are_cut_into_prefixed_pieces() {
    let (out, n) = run(&[b"abcdefghij\n"], 4);
    assert_eq!(out, "[slot 1] abcd\n[slot 1] efgh\n[slot 1] ij\n");
    assert_eq!(n, 3);
    // A line of exactly the limit is no piece: it waits for its newline.
    let (out, n) = run(&[b"abcd", b"\nxy\n"], 4);
    assert_eq!(out, "[slot 1] abcd\n[slot 1] xy\n");
    assert_eq!(n, 2);
    // An endless line comes out in pieces as it grows, whatever the chunks.
    let mut lines = Lines::new("> ", 4);
    let mut out = Vec::new();
    assert_eq!(lines.feed(b"abc", true, &mut out), 0);
    assert_eq!(lines.feed(b"defghi", true, &mut out), 2);
    assert_eq!(String::from_utf8_lossy(&out), "> abcd\n> efgh\n");
}

#[test]
fn dropped_lines_are_counted_and_what_follows_starts_a_line() {
    let mut lines = Lines::new("[slot 2] ", 100);
    let mut out = Vec::new();
    assert_eq!(lines.feed(b"kept\nhal", true, &mut out), 1);
    // Not kept: the line begun above and the next are counted, the unfinished one is carried.
    assert_eq!(lines.feed(b"f\nsecond\nthi", false, &mut out), 2);
    assert_eq!(lines.feed(b"rd\n", true, &mut out), 1);
    assert_eq!(
        String::from_utf8_lossy(&out),
        "[slot 2] kept\n[slot 2] third\n"
    );
}

#[test]
fn the_pace_lets_a_burst_through_then_holds_the_rate() {
    let t0 = Instant::now();
    let mut pace = Pace::new(1000, t0);
    // One second's worth goes at once.
    assert_eq!(pace.took(1000, t0), None);
    // Beyond it, each byte waits its share.
    assert_eq!(pace.took(500, t0), Some(Duration::from_millis(500)));
    // After a quiet time, a burst again.
    let later = t0 + Duration::from_secs(10);
    assert_eq!(pace.took(1000, later), None);
    assert_eq!(pace.took(100, later), Some(Duration::from_millis(100)));
}

/// A writer that blocks until the test lets it go, then keeps what it got.
#[derive(Clone, Default)]
struct Gate {
    open: Arc<(Mutex<bool>, std::sync::Condvar)>,
    got: Arc<Mutex<Vec<u8>>>,
}

impl Gate {
    fn open(&self) {
        let (lock, cv) = &*self.open;
        *lock.lock().expect("gate") = true;
        cv.notify_all();
    }

    fn got(&self) -> String {
        String::from_utf8_lossy(&self.got.lock().expect("got")).into_owned()
    }
}

impl Write for Gate {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let (lock, cv) = &*self.open;
        let mut open = lock.lock().expect("gate");
        while !*open {
            open = cv.wait(open).expect("gate");
        }
        self.got.lock().expect("got").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn eventually(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[tokio::test]
async fn a_stalled_output_drops_whole_lines_and_counts_them() {
    let gate = Gate::default();
    let sink = Sink::new("test-sink", gate.clone(), 64);
    let dropped = Arc::new(Dropped::default());
    let (mut worker, primary_end) = tokio::io::duplex(1 << 20);
    let task = {
        let dropped = dropped.clone();
        tokio::spawn(async move {
            forward_to(
                primary_end,
                "[w] ",
                &sink,
                u64::MAX,
                Duration::from_millis(1),
                &dropped,
            )
            .await;
            sink
        })
    };
    use tokio::io::AsyncWriteExt;
    // Enough to fill the sink (the gate holds its thread in its first write).
    for i in 0..1000 {
        worker
            .write_all(format!("line {i}\n").as_bytes())
            .await
            .expect("write");
        tokio::task::yield_now().await;
    }
    drop(worker);
    let _sink = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the forwarder does not wait for the output")
        .expect("forwarder");
    assert!(dropped.lines() > 0, "some lines were dropped");
    gate.open();
    eventually("what was queued to be written", || {
        gate.got().lines().count() as u64 + dropped.lines() == 1000
    });
    let got = gate.got();
    for line in got.lines() {
        let n = line
            .strip_prefix("[w] line ")
            .and_then(|n| n.parse::<u32>().ok());
        assert!(n.is_some_and(|n| n < 1000), "a whole line: {line:?}");
    }
}

#[tokio::test]
async fn a_flood_is_read_at_the_pace() {
    let gate = Gate::default();
    gate.open();
    let sink = Sink::new("test-sink", gate.clone(), 1 << 20);
    let dropped = Arc::new(Dropped::default());
    let (mut worker, primary_end) = tokio::io::duplex(4096);
    let rate = 64 * 1024;
    let started = Instant::now();
    let task = tokio::spawn(async move {
        forward_to(primary_end, "", &sink, rate, PATIENCE, &dropped).await;
    });
    use tokio::io::AsyncWriteExt;
    // A burst (one second's worth) and half a second more (the reader reads ahead of its pace
    // by what it read last, and the last write ends once 4 KiB are left).
    let line = [b'x'; 1023];
    for _ in 0..96 {
        worker.write_all(&line).await.expect("write");
        worker.write_all(b"\n").await.expect("write");
    }
    let took = started.elapsed();
    drop(worker);
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("ends")
        .expect("forwarder");
    assert!(
        took >= Duration::from_millis(300),
        "the reader paced itself: {took:?}"
    );
    eventually("everything written", || gate.got().len() == 96 * 1024);
}

#[tokio::test]
async fn a_sink_slow_for_a_moment_loses_nothing() {
    let gate = Gate::default();
    let sink = Sink::new("test-sink", gate.clone(), 64);
    let dropped = Arc::new(Dropped::default());
    let (mut worker, primary_end) = tokio::io::duplex(256);
    let task = {
        let dropped = dropped.clone();
        tokio::spawn(async move {
            forward_to(
                primary_end,
                "[w] ",
                &sink,
                u64::MAX,
                Duration::from_secs(5),
                &dropped,
            )
            .await;
        })
    };
    let opener = {
        let gate = gate.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            gate.open();
        })
    };
    use tokio::io::AsyncWriteExt;
    for i in 0..500 {
        worker
            .write_all(format!("line {i}\n").as_bytes())
            .await
            .expect("write");
    }
    drop(worker);
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("ends")
        .expect("forwarder");
    opener.join().expect("opener");
    assert_eq!(dropped.lines(), 0);
    eventually("every line", || gate.got().lines().count() == 500);
    let want: String = (0..500).map(|i| format!("[w] line {i}\n")).collect();
    assert_eq!(gate.got(), want);
}
