//! Unit tests of [`super`].

use super::*;
use crate::command::ScaleReport;
use crate::status::Status;
use crate::supervisor::ReloadReport;
use crate::upgrade::UpgradeReport;
use serde::Deserialize;

#[test]
fn requests_on_the_wire() {
    let req = Envelope {
        version: 1,
        request: Request::Scale { workers: 4 },
    };
    assert_eq!(
        serde_json::to_string(&req).expect("json"),
        r#"{"version":1,"command":"scale","workers":4}"#
    );
    let back: Envelope =
        serde_json::from_str(r#"{"command":"status","version":1}"#).expect("parse");
    assert_eq!(back.request, Request::Status);
    assert!(serde_json::from_str::<Envelope>(r#"{"version":1,"command":"dance"}"#).is_err());
}

fn status() -> Status {
    Status {
        schema: crate::STATUS_SCHEMA,
        pid: 4242,
        version: "0.1.0".into(),
        commit: "1a2b3c4".into(),
        uptime_ms: 10,
        policy: "round-robin".into(),
        generation: 2,
        workers_wanted: 1,
        stopping: false,
        reload: None,
        last_reload_error: None,
        listeners: Vec::new(),
        slots: Vec::new(),
        workers: Vec::new(),
        output_dropped_lines: 0,
        log_dropped_lines: 0,
    }
}

fn every_reply() -> Vec<Reply> {
    vec![
        Reply::Status { result: status() },
        Reply::Scaled {
            result: ScaleReport {
                from: 1,
                to: 2,
                started: vec![3],
                stopped: vec![],
            },
        },
        Reply::Stopped {
            result: StopReport { workers_exited: 2 },
        },
        Reply::Reloaded {
            result: ReloadReport {
                generation: 3,
                replaced: vec![(1, Some(3), 5)],
                serving_ms: 9,
                took_ms: 12,
            },
        },
        Reply::Upgraded {
            result: UpgradeReport {
                old_pid: 1,
                new_pid: 2,
                generation: 2,
                listeners: 1,
                sockets: 1,
                took_ms: 14,
            },
        },
        Reply::error("no"),
    ]
}

#[test]
fn replies_on_the_wire() {
    let r = Response::new(Reply::error("no"));
    assert_eq!(
        serde_json::to_string(&r).expect("json"),
        r#"{"version":2,"ok":false,"reply":"error","error":"no"}"#
    );
    let r = Response::new(Reply::Stopped {
        result: StopReport { workers_exited: 2 },
    });
    assert_eq!(
        serde_json::to_string(&r).expect("json"),
        r#"{"version":2,"ok":true,"reply":"stopped","result":{"workers_exited":2}}"#
    );
}

#[test]
fn every_reply_round_trips() {
    for reply in every_reply() {
        let sent = Response::new(reply);
        let line = serde_json::to_vec(&sent).expect("json");
        let back: Response = serde_json::from_slice(&line).expect("parse");
        assert_eq!(back, sent);
    }
}

#[test]
fn a_reply_cannot_say_ok_and_carry_an_error() {
    for line in [
        r#"{"version":2,"ok":true,"reply":"error","error":"x"}"#,
        r#"{"version":2,"ok":false,"reply":"stopped","result":{"workers_exited":1}}"#,
    ] {
        let err = serde_json::from_str::<Response>(line).expect_err(line);
        assert!(err.to_string().contains("a reply that says ok"), "{err}");
    }
    // A success without its result, or an error without its reason, is no reply either.
    for line in [
        r#"{"version":2,"ok":true,"reply":"stopped"}"#,
        r#"{"version":2,"ok":false,"reply":"error"}"#,
        r#"{"version":2,"ok":true,"reply":"dance","result":1}"#,
    ] {
        assert!(serde_json::from_str::<Response>(line).is_err(), "{line}");
    }
    assert!(
        every_reply()
            .iter()
            .filter(|r| !r.is_ok())
            .all(|r| matches!(r, Reply::Error { .. }))
    );
}

#[test]
fn replies_name_the_request_they_answer() {
    let requests = [
        Request::Status,
        Request::Scale { workers: 2 },
        Request::Stop,
        Request::Reload,
        Request::Upgrade,
    ];
    for (request, reply) in requests.iter().zip(every_reply()) {
        assert_eq!(Reply::name_for(request), reply.name());
    }
}

#[test]
fn version_1_is_still_spoken_both_ways() {
    // Requests of either version; others are refused, naming theirs.
    let v1 = parse_envelope(br#"{"version":1,"command":"reload"}"#).expect("v1");
    assert_eq!((v1.version, v1.request), (1, Request::Reload));
    let v2 = parse_envelope(br#"{"version":2,"command":"reload"}"#).expect("v2");
    assert_eq!(v2.version, 2);
    let err = parse_envelope(br#"{"version":9,"command":"status"}"#).expect_err("v9");
    assert!(err.contains("version 9"), "{err}");
    assert_eq!(reply_version(br#"{"version":1,"command":"dance"}"#), 1);
    assert_eq!(reply_version(b"{not json"), CONTROL_VERSION);

    // A version 1 client reads the answer it is given as it always did.
    #[derive(Deserialize)]
    struct Version1 {
        version: u32,
        ok: bool,
        result: Option<ScaleReport>,
        error: Option<String>,
    }
    let scaled = every_reply().swap_remove(1);
    let line = serde_json::to_vec(&Response {
        version: 1,
        reply: scaled.clone(),
    })
    .expect("json");
    let old: Version1 = serde_json::from_slice(&line).expect("a version 1 reply");
    assert_eq!((old.version, old.ok, old.error), (1, true, None));
    let Reply::Scaled { result } = &scaled else {
        panic!("scaled");
    };
    assert_eq!(old.result.as_ref(), Some(result));

    // And a version 1 primary's answers decode, by the request they answer.
    let got = decode_reply(
        &Request::Stop,
        br#"{"version":1,"ok":true,"result":{"workers_exited":2}}"#,
    )
    .expect("v1 stop");
    assert_eq!(
        got,
        Response {
            version: 1,
            reply: Reply::Stopped {
                result: StopReport { workers_exited: 2 }
            }
        }
    );
    let got = decode_reply(
        &Request::Upgrade,
        br#"{"version":1,"ok":false,"error":"control protocol version 2 is not spoken here (this primary speaks 1)"}"#,
    )
    .expect("v1 error");
    assert_eq!(got.version, 1);
    assert!(matches!(got.reply, Reply::Error { error } if error.contains("version 2")));
    assert!(
        decode_reply(
            &Request::Status,
            br#"{"version":1,"ok":true,"result":{"pid":1}}"#
        )
        .is_err()
    );
}

#[test]
fn the_default_path_is_per_user() {
    let p = default_path();
    assert!(p.ends_with("default.sock") || std::env::var_os(CONTROL_ENV).is_some());
}

#[test]
fn a_full_house_evicts_the_oldest_connection_that_has_not_asked() {
    let held = Arc::new(std::sync::Mutex::new(Held::default()));
    let mut places: Vec<_> = (0..MAX_CLIENTS)
        .map(|_| admit(&held).expect("room"))
        .collect();
    // The first two have asked: they are being answered and are never evicted.
    assert!(places[0].0.asked());
    assert!(places[1].0.asked());
    assert_eq!(lock(&held).count, MAX_CLIENTS);
    let (_newcomer, _) = admit(&held).expect("room made");
    assert_eq!(lock(&held).count, MAX_CLIENTS, "one out, one in");
    // The oldest that had not asked (the third) was told, and can no longer ask.
    assert!(places[2].1.try_recv().is_ok());
    assert!(!places[2].0.asked());
    assert!(places[3].1.try_recv().is_err());
    // Its end does not count it out twice.
    drop(places.remove(2));
    assert_eq!(lock(&held).count, MAX_CLIENTS);
    drop(places.remove(0));
    assert_eq!(lock(&held).count, MAX_CLIENTS - 1);
}

#[test]
fn a_house_full_of_requests_refuses_the_next() {
    let held = Arc::new(std::sync::Mutex::new(Held::default()));
    let mut places: Vec<_> = (0..MAX_CLIENTS)
        .map(|_| admit(&held).expect("room"))
        .collect();
    for (place, _) in &mut places {
        assert!(place.asked());
    }
    assert!(admit(&held).is_none());
    drop(places);
    assert_eq!(lock(&held).count, 0);
}

#[test]
fn a_directory_others_can_write_to_is_refused_unless_sticky() {
    let dir = Path::new("/some/dir");
    assert!(check_closed(dir, 0o700).is_ok());
    assert!(check_closed(dir, 0o755).is_ok());
    assert!(check_closed(dir, 0o1777).is_ok());
    let e = check_closed(dir, 0o777).expect_err("open");
    assert!(e.to_string().contains("/some/dir is mode 0777"), "{e}");
    assert!(check_closed(dir, 0o770).is_err());
}
