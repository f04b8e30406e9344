//! Cost of one message with one file descriptor: [`Channel`] against plain `sendmsg`/`recvmsg`.
//!
//! Four benchmarks in the group `fd_passing`, each reporting the time of **one message** (one
//! criterion iteration is one message; `Throughput::Elements(1)`):
//!
//! * `baseline/one_way`: blocking [`send_with_fds`] + [`recv_with_fds`] (thin wrappers around
//!   nix's `sendmsg` and `libc::recvmsg` with `SCM_RIGHTS`) on a `SOCK_SEQPACKET` socketpair,
//!   carrying the read end of a pipe created once; the receiver drops (closes) the descriptor.
//! * `baseline/round_trip`: A → B and B → A, sequentially in one thread; B echoes the
//!   descriptor it received, then closes it.
//! * `channel/one_way`: [`Channel::send`] of a [`ToWorker::ListenOk`] with the same descriptor,
//!   then [`Channel::recv`], inside a tokio current-thread runtime.
//! * `channel/round_trip`: as the baseline round trip, over two [`Channel`] ends.
//!
//! The baseline sends exactly the bytes of the encoded channel frame, so both move the same
//! payload. The async cases run [`BATCH`] messages per `rt.block_on`, so entering the runtime
//! is amortised as it is in a long-running task.
//!
//! Run with `cargo bench -p netcluster-protocol --bench channel`; results are in
//! `docs/benchmarks.md`.

use std::hint::black_box;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use netcluster_protocol::Channel;
use netcluster_protocol::codec::{self, DEFAULT_MAX_FRAME};
use netcluster_protocol::fd::{recv_with_fds, send_with_fds};
use netcluster_protocol::message::{BoundAddress, Grant, ToWorker};
use nix::fcntl::OFlag;
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};

/// Messages per `rt.block_on` in the async cases.
const BATCH: u64 = 100;

/// The message every case sends (one descriptor declared).
fn message() -> ToWorker {
    ToWorker::ListenOk {
        seq: 7,
        address: BoundAddress::Tcp("127.0.0.1:8124".parse().expect("address")),
        grant: Grant::Shared,
    }
}

/// The read end of a pipe (the descriptor that travels) and its write end (kept open so the
/// read end stays a live pipe).
fn pipe() -> (OwnedFd, OwnedFd) {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).expect("pipe2")
}

/// A blocking `SOCK_SEQPACKET` socketpair.
fn blocking_pair() -> (OwnedFd, OwnedFd) {
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .expect("socketpair")
}

/// Runs `iters` messages in chunks of [`BATCH`], one `block_on` per chunk, and returns the
/// total time.
fn run_batched<F, Fut>(rt: &tokio::runtime::Runtime, iters: u64, mut chunk: F) -> Duration
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let start = Instant::now();
    let mut left = iters;
    while left > 0 {
        let n = left.min(BATCH);
        rt.block_on(chunk(n));
        left -= n;
    }
    start.elapsed()
}

fn bench(c: &mut Criterion) {
    let msg = message();
    let frame = codec::encode(&msg, DEFAULT_MAX_FRAME).expect("encode");
    let (pipe_r, _pipe_w) = pipe();

    let mut group = c.benchmark_group("fd_passing");
    group.throughput(Throughput::Elements(1));

    // ---- baseline: the bare system calls, blocking sockets ----
    {
        let (a, b) = blocking_pair();
        let mut buf = [0u8; 64];

        group.bench_function("baseline/one_way", |bch| {
            bch.iter(|| {
                send_with_fds(a.as_fd(), black_box(&frame), &[pipe_r.as_fd()]).expect("send");
                let got = recv_with_fds(b.as_fd(), &mut buf, 1).expect("recv");
                assert_eq!(got.fds.len(), 1);
                black_box(&buf[..got.len]);
                // Dropping `got` closes the received descriptor.
            });
        });

        group.bench_function("baseline/round_trip", |bch| {
            bch.iter(|| {
                send_with_fds(a.as_fd(), black_box(&frame), &[pipe_r.as_fd()]).expect("send a");
                let got = recv_with_fds(b.as_fd(), &mut buf, 1).expect("recv b");
                assert_eq!(got.fds.len(), 1);
                send_with_fds(b.as_fd(), &buf[..got.len], &[got.fds[0].as_fd()]).expect("send b");
                drop(got);
                let back = recv_with_fds(a.as_fd(), &mut buf, 1).expect("recv a");
                assert_eq!(back.fds.len(), 1);
                black_box(&buf[..back.len]);
            });
        });
    }

    // ---- channel: encode + send, recv + decode, in a current-thread runtime ----
    {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .expect("runtime");
        let _enter = rt.enter();
        let (a, b) = Channel::pair().expect("channel pair");
        // References and a borrowed descriptor (all `Copy`) for the `async move` blocks.
        let (a, b, msg, fd) = (&a, &b, &msg, pipe_r.as_fd());

        group.bench_function("channel/one_way", |bch| {
            bch.iter_custom(|iters| {
                run_batched(&rt, iters, |n| async move {
                    for _ in 0..n {
                        a.send(black_box(msg), &[fd]).await.expect("send");
                        let (got, fds) = b.recv::<ToWorker>().await.expect("recv").expect("open");
                        assert_eq!(fds.len(), 1);
                        black_box(got);
                        // Dropping `fds` closes the received descriptor.
                    }
                })
            });
        });

        group.bench_function("channel/round_trip", |bch| {
            bch.iter_custom(|iters| {
                run_batched(&rt, iters, |n| async move {
                    for _ in 0..n {
                        a.send(black_box(msg), &[fd]).await.expect("send a");
                        let (got, fds) = b.recv::<ToWorker>().await.expect("recv b").expect("open");
                        b.send(&got, &[fds[0].as_fd()]).await.expect("send b");
                        drop(fds);
                        let (back, fds) =
                            a.recv::<ToWorker>().await.expect("recv a").expect("open");
                        assert_eq!(fds.len(), 1);
                        black_box(back);
                    }
                })
            });
        });
    }

    group.finish();
}

fn main() {
    let mut c = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    bench(&mut c);
    c.final_summary();
}
