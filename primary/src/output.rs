//! Program workers' output, copied to the primary's stdout and stderr without ever holding up
//! the primary.
//!
//! Each stream of a worker is read by a task (`forward`) in chunks of up to 64 KiB; line ends
//! are found with `memchr`, each line gets the worker's `[slot N] ` prefix (`Lines`), and the
//! prefixed lines go to a process-wide `Sink` per stream: a queue of at most
//! [`SINK_LIMIT`] bytes that one thread of its own writes out. The supervising loop and the
//! runtime never write to the primary's stdout or stderr themselves.
//!
//! - **A slow or stalled reader** (a terminal scrolled back, a log shipper that stopped
//!   reading a pipe): the sink's thread blocks in `write(2)` and its queue fills. A worker's
//!   reader then waits for room, up to [`PATIENCE`] (the worker meanwhile blocks on its pipe:
//!   a reader slower than a burst loses nothing); past that it drops the chunk it holds, as
//!   whole lines, and counts them (`Dropped`; `netcluster status` shows the counts). Dropping
//!   costs the primary a `memchr` over the chunk, nothing more: a dropped chunk is not
//!   prefixed.
//! - **A flooding worker** (`yes`): a worker's stream is read at most [`RATE`] bytes a second
//!   (with a burst of one second's worth). Past that the primary stops reading, the pipe
//!   fills, and the worker blocks in its own `write`: its problem, not the primary's, whose
//!   cost stays bounded whatever the worker does (0.03 core measured, see `docs/benchmarks.md`).
//!   Dropping alone would not bound it: reading a pipe at the speed `yes` fills it costs a
//!   core by itself.
//!
//! A line longer than [`MAX_LINE`] is cut into pieces of that size, each prefixed and ended by
//! a newline (each piece counts as a line); a line is never split at a chunk's edge, and the
//! unfinished line a worker leaves when it exits is ended with a newline.

use std::io::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, mpsc};
use std::time::{Duration, Instant};

/// The longest line copied whole; longer ones are cut into pieces of this size.
pub const MAX_LINE: usize = 16 * 1024;

/// How many bytes a second the primary reads from one stream of one worker, at most.
pub const RATE: u64 = 8 * 1024 * 1024;

/// How many bytes of output a `Sink` holds for its thread before it drops lines.
pub const SINK_LIMIT: usize = 1024 * 1024;

/// How long a reader waits for room in a full queue before it drops what it read: a sink
/// slower than a burst for a moment holds up the worker (it blocks on its pipe); a stalled one
/// costs lines, and slows the worker to one chunk per stream per wait.
pub const PATIENCE: Duration = Duration::from_millis(100);

/// How much is read from a worker's pipe at a time.
const CHUNK: usize = 64 * 1024;

/// The most a sink's thread writes in one `write(2)`.
const BATCH: usize = 256 * 1024;

/// Lines dropped, counted where they were dropped and read by `status`.
#[derive(Debug, Default)]
pub(crate) struct Dropped(AtomicU64);

impl Dropped {
    /// Lines dropped so far.
    pub fn lines(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    fn add(&self, lines: u64) {
        if lines > 0 {
            self.0.fetch_add(lines, Ordering::Relaxed);
            TOTAL.fetch_add(lines, Ordering::Relaxed);
        }
    }
}

/// Lines of every worker dropped since the primary started.
static TOTAL: AtomicU64 = AtomicU64::new(0);

/// Lines of workers' output dropped since this process started, over all workers (the dead
/// ones too).
pub fn dropped_lines() -> u64 {
    TOTAL.load(Ordering::Relaxed)
}

type LogDrops = Box<dyn Fn() -> u64 + Send + Sync>;
static LOG_DROPS: OnceLock<LogDrops> = OnceLock::new();

/// Tells `status` how to learn how many of the primary's own log lines were dropped (the log
/// writer's business: the `netcluster` binary logs through a lossy non-blocking writer). Only
/// the first call counts.
pub fn count_log_drops(counter: impl Fn() -> u64 + Send + Sync + 'static) {
    let _ = LOG_DROPS.set(Box::new(counter));
}

/// The primary's own log lines dropped so far (0 when nobody said how to count them).
pub fn log_dropped_lines() -> u64 {
    LOG_DROPS.get().map_or(0, |f| f())
}

/// Which of the primary's streams a worker's stream goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stream {
    /// The primary's stdout.
    Stdout,
    /// The primary's stderr.
    Stderr,
}

impl Stream {
    /// The process-wide sink of this stream (its thread starts on first use).
    pub fn sink(self) -> &'static Sink {
        static OUT: OnceLock<Sink> = OnceLock::new();
        static ERR: OnceLock<Sink> = OnceLock::new();
        match self {
            Stream::Stdout => {
                OUT.get_or_init(|| Sink::new("netcluster-stdout", std::io::stdout(), SINK_LIMIT))
            }
            Stream::Stderr => {
                ERR.get_or_init(|| Sink::new("netcluster-stderr", std::io::stderr(), SINK_LIMIT))
            }
        }
    }
}

/// Prefixed lines on their way to a sink's thread, and whose they are.
struct Batch {
    bytes: Vec<u8>,
    lines: u64,
    dropped: Arc<Dropped>,
}

/// A bounded queue of output and the thread that writes it (blocking, on a thread of its own).
pub(crate) struct Sink {
    tx: Option<mpsc::Sender<Batch>>,
    queued: Arc<AtomicUsize>,
    /// Told each time the thread has written a batch.
    written: Arc<tokio::sync::Notify>,
    limit: usize,
}

impl Sink {
    /// Starts the thread writing to `to`. A sink whose thread cannot start drops everything.
    pub fn new(name: &str, to: impl Write + Send + 'static, limit: usize) -> Sink {
        let (tx, rx) = mpsc::channel::<Batch>();
        let queued = Arc::new(AtomicUsize::new(0));
        let written = Arc::new(tokio::sync::Notify::new());
        let (q, w) = (queued.clone(), written.clone());
        let started = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || write_out(&rx, to, &q, &w));
        if let Err(e) = &started {
            tracing::warn!("cannot start the output thread {name}: worker output is dropped: {e}");
        }
        Sink {
            tx: started.ok().map(|_| tx),
            queued,
            written,
            limit,
        }
    }

    /// Waits until the queue has room, at most `patience`; whether it has.
    pub async fn room(&self, patience: Duration) -> bool {
        if self.has_room() || self.tx.is_none() {
            return self.has_room();
        }
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let written = self.written.notified();
            tokio::pin!(written);
            written.as_mut().enable();
            if self.has_room() {
                return true;
            }
            if tokio::time::timeout_at(deadline, written).await.is_err() {
                return self.has_room();
            }
        }
    }

    /// Whether the queue has room: lines offered now would be taken.
    pub fn has_room(&self) -> bool {
        self.tx.is_some() && self.queued.load(Ordering::Relaxed) < self.limit
    }

    /// Queues `bytes` (`lines` whole lines) if there is room, else counts them in `dropped`.
    /// The queue may go past its limit by one offer.
    fn offer(&self, bytes: Vec<u8>, lines: u64, dropped: &Arc<Dropped>) {
        if lines == 0 {
            return;
        }
        let Some(tx) = self.tx.as_ref().filter(|_| self.has_room()) else {
            dropped.add(lines);
            return;
        };
        let len = bytes.len();
        self.queued.fetch_add(len, Ordering::Relaxed);
        let batch = Batch {
            bytes,
            lines,
            dropped: dropped.clone(),
        };
        if let Err(mpsc::SendError(batch)) = tx.send(batch) {
            self.queued.fetch_sub(len, Ordering::Relaxed);
            dropped.add(batch.lines);
        }
    }
}

/// A sink's thread: writes what is queued, several batches to a `write(2)`. What cannot be
/// written (the reader is gone) is counted as dropped.
fn write_out(
    rx: &mpsc::Receiver<Batch>,
    mut to: impl Write,
    queued: &AtomicUsize,
    written: &tokio::sync::Notify,
) {
    let mut buf = Vec::with_capacity(BATCH);
    let mut whose: Vec<(u64, Arc<Dropped>)> = Vec::new();
    while let Ok(first) = rx.recv() {
        buf.clear();
        whose.clear();
        let mut next = Some(first);
        while let Some(b) = next.take() {
            buf.extend_from_slice(&b.bytes);
            whose.push((b.lines, b.dropped));
            if buf.len() < BATCH {
                next = rx.try_recv().ok();
            }
        }
        if to.write_all(&buf).and_then(|()| to.flush()).is_err() {
            for (lines, dropped) in &whose {
                dropped.add(*lines);
            }
        }
        queued.fetch_sub(buf.len(), Ordering::Relaxed);
        written.notify_waiters();
    }
}

/// Cuts a stream into lines and prefixes each, across the edges of the chunks it arrives in.
#[derive(Debug)]
pub(crate) struct Lines {
    prefix: Vec<u8>,
    /// The unfinished line the last chunk ended with.
    carry: Vec<u8>,
    max_line: usize,
}

impl Lines {
    /// Lines prefixed by `prefix`, cut at `max_line` bytes.
    pub fn new(prefix: &str, max_line: usize) -> Lines {
        Lines {
            prefix: prefix.as_bytes().to_vec(),
            carry: Vec::new(),
            max_line: max_line.max(1),
        }
    }

    /// Takes the next chunk. The lines it finishes are appended to `out`, prefixed, when
    /// `keep`, else only counted. Returns how many lines it finished.
    pub fn feed(&mut self, chunk: &[u8], keep: bool, out: &mut Vec<u8>) -> u64 {
        let mut lines = 0u64;
        let mut rest = chunk;
        if !self.carry.is_empty() {
            match memchr::memchr(b'\n', rest) {
                Some(end) => {
                    let mut line = std::mem::take(&mut self.carry);
                    line.extend_from_slice(&rest[..end]);
                    lines += self.line(&line, keep, out);
                    line.clear();
                    self.carry = line;
                    rest = &rest[end + 1..];
                }
                None => {
                    self.carry.extend_from_slice(rest);
                    return self.cut_carry(keep, out);
                }
            }
        }
        let mut start = 0;
        for end in memchr::memchr_iter(b'\n', rest) {
            lines += self.line(&rest[start..end], keep, out);
            start = end + 1;
        }
        self.carry.extend_from_slice(&rest[start..]);
        lines + self.cut_carry(keep, out)
    }

    /// The stream ended: the unfinished line, if any, ended with a newline.
    pub fn finish(&mut self, keep: bool, out: &mut Vec<u8>) -> u64 {
        if self.carry.is_empty() {
            return 0;
        }
        let line = std::mem::take(&mut self.carry);
        self.line(&line, keep, out)
    }

    /// Lets out the pieces of the unfinished line that are already `max_line` long.
    fn cut_carry(&mut self, keep: bool, out: &mut Vec<u8>) -> u64 {
        // A piece only once more follows: a line of exactly `max_line` waits for its newline.
        if self.carry.len() <= self.max_line {
            return 0;
        }
        let whole = (self.carry.len() - 1) / self.max_line * self.max_line;
        let pieces = self.carry[..whole].chunks(self.max_line).count() as u64;
        if keep {
            for piece in self.carry[..whole].chunks(self.max_line) {
                self.put(piece, out);
            }
        }
        self.carry.drain(..whole);
        pieces
    }

    /// One line (without its newline): its pieces, prefixed, each ending with a newline.
    fn line(&self, line: &[u8], keep: bool, out: &mut Vec<u8>) -> u64 {
        if line.len() <= self.max_line {
            if keep {
                self.put(line, out);
            }
            return 1;
        }
        let mut pieces = 0;
        for piece in line.chunks(self.max_line) {
            if keep {
                self.put(piece, out);
            }
            pieces += 1;
        }
        pieces
    }

    fn put(&self, piece: &[u8], out: &mut Vec<u8>) {
        out.extend_from_slice(&self.prefix);
        out.extend_from_slice(piece);
        out.push(b'\n');
    }
}

/// A reader's pace: at most `rate` bytes a second on average, with a burst of one second's
/// worth (a generic cell rate algorithm on a virtual clock).
#[derive(Debug)]
pub(crate) struct Pace {
    rate: u64,
    /// When the bytes read so far would have been read at `rate`.
    due: Instant,
}

impl Pace {
    /// At most `rate` bytes a second (at least 1).
    pub fn new(rate: u64, now: Instant) -> Pace {
        Pace {
            rate: rate.max(1),
            due: now,
        }
    }

    /// Counts `n` bytes read at `now`; how long to wait before reading more, if at all.
    pub fn took(&mut self, n: usize, now: Instant) -> Option<Duration> {
        let burst = Duration::from_secs(1);
        if self.due < now {
            self.due = now;
        }
        let nanos = (n as u128).saturating_mul(1_000_000_000) / u128::from(self.rate);
        self.due += Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX));
        // Within the burst: go on reading.
        let ahead = self.due.saturating_duration_since(now);
        (ahead > burst).then(|| ahead - burst)
    }
}

/// Copies one stream of a program worker to the primary's `to`, each line prefixed by
/// `prefix`; lines the primary's output has no room for are counted in `dropped`. Ends when
/// the worker's end of the pipe is closed.
pub(crate) async fn forward(
    from: impl tokio::io::AsyncRead + Unpin,
    prefix: String,
    to: Stream,
    dropped: Arc<Dropped>,
) {
    forward_to(from, &prefix, to.sink(), RATE, PATIENCE, &dropped).await;
}

/// [`forward`], to any sink at any rate.
pub(crate) async fn forward_to(
    mut from: impl tokio::io::AsyncRead + Unpin,
    prefix: &str,
    sink: &Sink,
    rate: u64,
    patience: Duration,
    dropped: &Arc<Dropped>,
) {
    use tokio::io::AsyncReadExt;
    let mut lines = Lines::new(prefix, MAX_LINE);
    let mut pace = Pace::new(rate, Instant::now());
    let mut chunk = vec![0u8; CHUNK];
    loop {
        let n = match from.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let keep = sink.room(patience).await;
        let mut out = Vec::new();
        let count = lines.feed(&chunk[..n], keep, &mut out);
        if keep {
            sink.offer(out, count, dropped);
        } else {
            dropped.add(count);
        }
        if let Some(wait) = pace.took(n, Instant::now()) {
            tokio::time::sleep(wait).await;
        }
    }
    let keep = sink.room(patience).await;
    let mut out = Vec::new();
    let count = lines.finish(keep, &mut out);
    if keep {
        sink.offer(out, count, dropped);
    } else {
        dropped.add(count);
    }
}

#[cfg(test)]
mod tests;
