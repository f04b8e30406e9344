//! The fuzz targets' harnesses on stable: every input of the checked-in corpus
//! (`fuzz/corpus/TARGET/`, seeds plus what the fuzzers kept) and random inputs from proptest go
//! through `netcluster::fuzzing`, exactly as `cargo fuzz run TARGET` feeds them. A panic is a
//! finding. `cargo test --test fuzz_corpus -- --ignored write_seed_corpus` rewrites the seeds.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use netcluster::fuzzing;
use proptest::prelude::*;

/// A fuzz target: its name and its harness.
type Target = (&'static str, fn(&[u8]));

const TARGETS: [Target; 4] = [
    ("decode_frames", fuzzing::decode_frames),
    ("channel_receive", fuzzing::channel_receive),
    ("control_request", fuzzing::control_request),
    ("listen_value", fuzzing::listen_value),
];

fn corpus(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

#[test]
fn the_checked_in_corpus_replays_cleanly() {
    for (target, harness) in TARGETS {
        let dir = corpus(target);
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let result = std::panic::catch_unwind(|| harness(&data));
            assert!(result.is_ok(), "{target}: {} panics", path.display());
            n += 1;
        }
        assert!(n >= 5, "{target}: only {n} corpus entries");
        eprintln!("{target}: {n} corpus inputs replayed");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_frames(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        fuzzing::decode_frames(&data);
    }

    #[test]
    fn random_frames_behind_a_good_version_byte(
        variant in 0u8..16,
        rest in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let mut data = vec![netcluster::protocol::PROTOCOL_VERSION, variant];
        data.extend(rest);
        fuzzing::decode_frames(&data);
    }

    #[test]
    fn random_datagrams_with_random_descriptors(data in proptest::collection::vec(any::<u8>(), 1..512)) {
        fuzzing::channel_receive(&data);
    }

    #[test]
    fn random_control_requests(data in proptest::collection::vec(any::<u8>(), 0..256)) {
        fuzzing::control_request(&data);
    }

    #[test]
    fn random_json_control_requests(
        version in 0u32..3,
        command in "[a-z]{0,8}",
        workers in any::<i64>(),
    ) {
        let line = format!(r#"{{"version":{version},"command":"{command}","workers":{workers}}}"#);
        fuzzing::control_request(line.as_bytes());
    }

    #[test]
    fn random_listen_values(s in "\\PC{0,160}") {
        fuzzing::listen_value(s.as_bytes());
    }

    #[test]
    fn random_listen_shaped_values(
        host in "[0-9a-f:.\\[\\]]{0,45}",
        port in "[0-9]{0,7}",
    ) {
        fuzzing::listen_value(format!("{host}:{port}").as_bytes());
    }
}

/// Writes the seed inputs of every target (run by hand after the protocol changes).
#[test]
#[ignore = "rewrites fuzz/corpus seeds"]
fn write_seed_corpus() {
    use netcluster::cluster::control::{CONTROL_VERSION, Envelope, Request};
    use netcluster::protocol::codec::{DEFAULT_MAX_FRAME, encode};
    use netcluster::protocol::message::*;
    let write = |target: &str, name: &str, data: &[u8]| {
        let dir = corpus(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("seed-{name}")), data).unwrap();
    };
    let key = ListenKey {
        target: ListenTarget::Tcp("127.0.0.1:8124".parse().unwrap()),
        ordinal: 0,
    };
    let up = [
        ToPrimary::Hello {
            version: PROTOCOL_VERSION,
            pid: 4242,
            worker_id: 1,
        },
        ToPrimary::Listen {
            seq: 1,
            key: key.clone(),
            params: ListenParams::default(),
        },
        ToPrimary::Close { key: key.clone() },
        ToPrimary::Message {
            data: b"hello".to_vec(),
            handle: None,
        },
        ToPrimary::Message {
            data: b"a socket".to_vec(),
            handle: Some(HandleKind::Socket { origin: None }),
        },
        ToPrimary::Disconnect,
        ToPrimary::Stopping { signal: 2 },
        ToPrimary::CountReply { seq: 3, count: 7 },
        ToPrimary::CountRequest {
            seq: 4,
            key: key.clone(),
        },
        ToPrimary::Accepted {
            listener: 1,
            accepted: vec![9, 10],
            refused: Vec::new(),
        },
        ToPrimary::Pong { seq: 2 },
        ToPrimary::Stats {
            seq: 5,
            listeners: vec![ListenerStats {
                key: key.clone(),
                open: 1,
                served: 2,
            }],
        },
    ];
    let down = [
        ToWorker::Welcome {
            version: PROTOCOL_VERSION,
            drain_timeout_ms: 10_000,
        },
        ToWorker::ListenOk {
            seq: 1,
            address: BoundAddress::Tcp("127.0.0.1:8124".parse().unwrap()),
            grant: Grant::RoundRobin { listener: 1 },
        },
        ToWorker::Connections {
            listener: 1,
            seqs: vec![9],
            expires_ms: 123_456,
        },
        ToWorker::CountResult {
            seq: 4,
            result: Err(CountError::WorkerExited { worker: 2 }),
        },
        ToWorker::Shutdown {
            drain_timeout_ms: 5000,
        },
    ];
    for (i, m) in up.iter().enumerate() {
        let frame = encode(m, DEFAULT_MAX_FRAME).unwrap();
        write("decode_frames", &format!("up{i}"), &frame);
        let mut with_n = vec![0u8];
        with_n.extend_from_slice(&frame);
        write("channel_receive", &format!("up{i}"), &with_n);
        with_n[0] = 1;
        write("channel_receive", &format!("up{i}-fd"), &with_n);
        with_n[0] = 40;
        write("channel_receive", &format!("up{i}-40fds"), &with_n);
    }
    for (i, m) in down.iter().enumerate() {
        write(
            "decode_frames",
            &format!("down{i}"),
            &encode(m, DEFAULT_MAX_FRAME).unwrap(),
        );
    }
    for (i, r) in [
        Request::Status,
        Request::Scale { workers: 4 },
        Request::Stop,
        Request::Reload,
        Request::Upgrade,
    ]
    .into_iter()
    .enumerate()
    {
        let line = serde_json::to_vec(&Envelope {
            version: CONTROL_VERSION,
            request: r,
        })
        .unwrap();
        write("control_request", &format!("req{i}"), &line);
    }
    write(
        "control_request",
        "bad-version",
        br#"{"version":9,"command":"status"}"#,
    );
    write("control_request", "no-version", br#"{"command":"status"}"#);
    for (i, v) in [
        "127.0.0.1:8124",
        "[::1]:0",
        "8124",
        "/run/app.sock",
        "app.sock",
        "localhost:80",
        "[::1]8124",
        "0.0.0.0:65535",
    ]
    .iter()
    .enumerate()
    {
        write("listen_value", &format!("v{i}"), v.as_bytes());
    }
}
