//! Unit tests of [`super`].

use super::*;
use std::os::fd::AsRawFd;

fn inode(fd: &impl AsRawFd) -> u64 {
    std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .expect("stat fd")
}

fn tcp0(ordinal: u32) -> ListenKey {
    ListenKey {
        target: ListenTarget::Tcp("127.0.0.1:0".parse().expect("addr")),
        ordinal,
    }
}

fn shared() -> Registry {
    Registry::new(SchedulingPolicy::Shared, 4)
}

fn join(r: &mut Registry, key: &ListenKey, worker: u32) -> (u64, Option<OwnedFd>, BoundAddress) {
    let p = ListenParams::default();
    let id = match r.find(key) {
        Some(id) => id,
        None => r.bind(key, &p, None).expect("bind").id,
    };
    r.get_mut(id).expect("bound").members.insert(worker);
    let (address, _, fd) = r.grant(id, None).expect("grant");
    (id, fd, address)
}

#[test]
fn same_key_same_socket_other_ordinal_other_port() {
    let mut r = shared();
    let (a, a_fd, a_addr) = join(&mut r, &tcp0(0), 1);
    let (b, b_fd, b_addr) = join(&mut r, &tcp0(0), 2);
    assert_eq!((a, &a_addr), (b, &b_addr));
    assert_eq!(inode(&a_fd.expect("fd")), inode(&b_fd.expect("fd")));
    let (_, _, c_addr) = join(&mut r, &tcp0(1), 1);
    assert_ne!(a_addr, c_addr);
}

#[test]
fn last_member_leaving_closes_and_unlinks_unless_pinned() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("s.sock");
    let key = ListenKey {
        target: ListenTarget::Unix(path.clone()),
        ordinal: 0,
    };
    let mut r = shared();
    let (id, _, _) = join(&mut r, &key, 1);
    join(&mut r, &key, 2);
    assert!(r.leave(id, 1).is_none());
    assert!(path.exists());
    drop(r.leave(id, 2).expect("closed by the last member"));
    assert!(!path.exists());
    assert!(r.find(&key).is_none());

    // A pinned listener stays open with no member.
    let pinned = r
        .bind(&key, &ListenParams::default(), Some("web".into()))
        .expect("pin");
    r.get_mut(pinned.id).expect("bound").members.insert(3);
    assert!(r.leave(pinned.id, 3).is_none());
    assert!(path.exists());
    assert_eq!(r.get(pinned.id).expect("open").name, "web");
    r.close_all();
    assert!(!path.exists());
}

#[test]
fn failed_bind_is_forgotten_and_named() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let key = ListenKey {
        target: ListenTarget::Tcp(addr),
        ordinal: 0,
    };
    let mut r = shared();
    let err = r
        .bind(&key, &ListenParams::default(), None)
        .expect_err("in use");
    assert_eq!(err.errno(), Some(libc::EADDRINUSE));
    assert!(err.to_string().contains(&addr.to_string()));
    assert!(r.find(&key).is_none());
    drop(taken);
    r.bind(&key, &ListenParams::default(), None)
        .expect("retry succeeds once the port is free");
}

#[test]
fn a_stale_pinned_unix_socket_is_replaced_and_a_live_one_is_not() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("stale.sock");
    let key = ListenKey {
        target: ListenTarget::Unix(path.clone()),
        ordinal: 0,
    };
    // A socket file nobody listens on, as a crashed primary leaves it.
    drop(std::os::unix::net::UnixListener::bind(&path).expect("bind"));
    assert!(path.exists());
    let mut r = shared();
    let err = r
        .bind(&key, &ListenParams::default(), None)
        .expect_err("a worker's listen keeps Node's EADDRINUSE");
    assert_eq!(err.errno(), Some(libc::EADDRINUSE));
    r.bind(&key, &ListenParams::default(), Some("s".into()))
        .expect("the operator's listener replaces the stale file");
    let mut other = shared();
    let err = other
        .bind(&key, &ListenParams::default(), Some("s".into()))
        .expect_err("live");
    assert_eq!(
        err.to_string(),
        format!(
            "listen {}: another server is listening on this socket",
            path.display()
        )
    );
}

#[test]
fn reuse_port_gives_each_slot_its_own_socket_on_one_port() {
    let mut r = Registry::new(SchedulingPolicy::ReusePort, 4);
    let b = r
        .bind(&tcp0(0), &ListenParams::default(), None)
        .expect("reserve");
    let (address, grant, one) = r.grant(b.id, Some(1)).expect("slot 1");
    assert_eq!(grant, Grant::Slot);
    assert_ne!(address.port(), Some(0));
    let (address2, _, two) = r.grant(b.id, Some(2)).expect("slot 2");
    assert_eq!(address, address2, "one port");
    let (_, _, one_again) = r.grant(b.id, Some(1)).expect("slot 1 again");
    let (one, two, one_again) = (one.expect("fd"), two.expect("fd"), one_again.expect("fd"));
    assert_ne!(inode(&one), inode(&two), "a socket per slot");
    assert_eq!(inode(&one), inode(&one_again), "the slot keeps its socket");
    let slots = match &mut r.get_mut(b.id).expect("l").mode {
        Mode::ReusePort(slots) => slots,
        _ => panic!("reuseport"),
    };
    assert_eq!(slots.group, vec![1, 2]);
    assert!(slots.remove(1).is_some());
    assert_eq!(
        slots.group,
        vec![2],
        "the last takes the leaving one's place"
    );
    // A worker without a slot gets the port to bind itself.
    let (_, grant, fd) = r.grant(b.id, None).expect("no slot");
    assert_eq!(grant, Grant::ReusePort);
    assert!(fd.is_none());
    // Unix sockets cannot reuse ports: they are shared.
    let dir = tempfile::tempdir().expect("tmp");
    let unix = ListenKey {
        target: ListenTarget::Unix(dir.path().join("u.sock")),
        ordinal: 0,
    };
    let u = r.bind(&unix, &ListenParams::default(), None).expect("unix");
    assert_eq!(r.grant(u.id, Some(1)).expect("grant").1, Grant::Shared);
}

#[test]
fn round_robin_listeners_come_with_an_accept_task_descriptor() {
    let mut r = Registry::new(SchedulingPolicy::RoundRobin, 4);
    let b = r
        .bind(&tcp0(0), &ListenParams::default(), None)
        .expect("bind");
    let (_, grant, fd) = r.grant(b.id, Some(1)).expect("grant");
    assert_eq!(grant, Grant::RoundRobin { listener: b.id });
    assert!(fd.is_none(), "the socket stays in the primary");
    let (dup, gate) = b.acceptor.expect("acceptor");
    let original = r
        .get(b.id)
        .expect("l")
        .socket()
        .expect("open")
        .try_clone_to_owned();
    assert_eq!(inode(&dup), inode(&original.expect("dup")));
    assert!(!gate.is_closed());
    drop(r.remove(b.id));
    assert!(
        gate.is_closed(),
        "closing the listener stops its accept task"
    );
}

#[test]
fn the_first_request_for_a_key_decides_the_backlog() {
    let mut r = shared();
    let first = ListenParams {
        backlog: 5,
        ..ListenParams::default()
    };
    let b = r.bind(&tcp0(0), &first, None).expect("bind");
    let port = r.get(b.id).expect("l").address.port().expect("tcp");
    let out = std::process::Command::new("ss")
        .args(["-ltnH", &format!("sport = :{port}")])
        .output();
    let Ok(out) = out else {
        eprintln!("skipped: `ss` (iproute2) is not installed");
        return;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.split_whitespace().nth(2), Some("5"), "{text}");
}

#[test]
fn an_exported_listener_is_adopted_as_it_was() {
    let dir = tempfile::tempdir().expect("tmp");
    let unix = ListenKey {
        target: ListenTarget::Unix(dir.path().join("a.sock")),
        ordinal: 0,
    };
    let mut old = Registry::new(SchedulingPolicy::RoundRobin, 4);
    let tcp = old
        .bind(&tcp0(1), &ListenParams::default(), Some("web".into()))
        .expect("bind");
    old.bind(&unix, &ListenParams::default(), None)
        .expect("bind unix");
    let records = old.export(|_| true).expect("export");
    assert_eq!(records.len(), 2);
    let web = &records[0];
    assert_eq!(web.info, old.get(tcp.id).expect("l").info());
    assert_eq!(web.info.name.as_deref(), Some("web"));
    assert_eq!(web.info.fdname.as_deref(), Some("web"));
    assert!(web.info.pinned && web.info.owned && !web.info.reuseport);
    assert_eq!(web.sockets(), 1);
    let exported_inode = inode(web.socket.as_ref().expect("socket"));

    let mut new = Registry::new(SchedulingPolicy::RoundRobin, 4);
    let infos: Vec<ListenerInfo> = records.iter().map(|r| r.info.clone()).collect();
    let mut ids = Vec::new();
    for record in records {
        let bound = new.adopt(record).expect("adopt");
        assert!(
            bound.acceptor.is_some(),
            "a round-robin listener's accept task"
        );
        ids.push(bound.id);
    }
    let adopted: Vec<ListenerInfo> = ids
        .iter()
        .map(|&id| new.get(id).expect("adopted").info())
        .collect();
    assert_eq!(adopted, infos, "the same key, names and flags");
    let l = new.get(ids[0]).expect("web");
    assert_eq!(l.address, old.get(tcp.id).expect("l").address);
    assert_eq!(inode(&l.socket().expect("open")), exported_inode);
    assert_eq!(new.find(&tcp0(1)), Some(ids[0]));
    // The predecessor's socket file is the new primary's to remove; the old one's copy
    // leaves it be.
    old.disarm_unlinks();
    old.close_all();
    assert!(dir.path().join("a.sock").exists());
    new.close_all();
    assert!(!dir.path().join("a.sock").exists());
}

#[test]
fn a_reuseport_listener_goes_out_with_the_slots_kept_and_comes_back_with_them() {
    let mut old = Registry::new(SchedulingPolicy::ReusePort, 4);
    let b = old
        .bind(&tcp0(0), &ListenParams::default(), Some("rp".into()))
        .expect("reserve");
    for slot in [1, 2, 3] {
        old.grant(b.id, Some(slot)).expect("slot");
    }
    let records = old.export(|slot| slot != 2).expect("export");
    let [record] = <[ListenerRecord; 1]>::try_from(records).expect("one");
    assert!(record.info.reuseport);
    assert!(record.socket.is_some(), "the reservation of the port");
    assert_eq!(
        record.slots.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        vec![1, 3],
        "slot 2 is being retired"
    );
    assert_eq!(record.sockets(), 3);

    // Under another policy it cannot be taken over, and says so.
    let mut shared = Registry::new(SchedulingPolicy::Shared, 4);
    let dup = |r: &ListenerRecord| ListenerRecord {
        info: r.info.clone(),
        socket: r.socket.as_ref().map(|fd| fd.try_clone().expect("dup")),
        slots: r
            .slots
            .iter()
            .map(|(s, fd)| (*s, fd.try_clone().expect("dup")))
            .collect(),
    };
    let err = shared.adopt(dup(&record)).expect_err("not reuseport");
    assert!(err.to_string().contains("reuseport"), "{err}");

    let mut new = Registry::new(SchedulingPolicy::ReusePort, 4);
    let bound = new.adopt(record).expect("adopt");
    assert!(bound.acceptor.is_none());
    let Mode::ReusePort(slots) = &new.get(bound.id).expect("l").mode else {
        panic!("reuseport");
    };
    assert_eq!(slots.group, vec![1, 3]);
}

#[test]
fn a_record_without_a_socket_is_refused() {
    let mut r = Registry::new(SchedulingPolicy::Shared, 4);
    let record = ListenerRecord {
        info: ListenerInfo {
            target: tcp0(0).target,
            ordinal: 0,
            name: None,
            fdname: None,
            pinned: true,
            owned: false,
            reuseport: false,
        },
        socket: None,
        slots: Vec::new(),
    };
    let err = r.adopt(record).expect_err("nothing to adopt");
    assert!(err.to_string().contains("no socket"), "{err}");
    assert_eq!(r.iter().count(), 0);
}

#[test]
fn policy_names() {
    assert_eq!("rr".parse(), Ok(SchedulingPolicy::RoundRobin));
    assert_eq!("none".parse(), Ok(SchedulingPolicy::Shared));
    assert_eq!("ReusePort".parse(), Ok(SchedulingPolicy::ReusePort));
    assert!("fastest".parse::<SchedulingPolicy>().is_err());
    assert_eq!(SchedulingPolicy::default(), SchedulingPolicy::RoundRobin);
}
