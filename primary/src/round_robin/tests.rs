//! Unit tests of [`super`].

use super::*;

fn conn(gate: &Arc<Gate>) -> (Conn, std::os::unix::net::UnixStream) {
    let (a, b) = std::os::unix::net::UnixStream::pair().expect("pair");
    (
        Conn {
            fd: Arc::new(a.into()),
            _ticket: gate.ticket(),
        },
        b,
    )
}

/// True once the far end sees the primary's copy closed (and no one else holds it).
///
/// Other tests of this binary spawn processes, and a child holds copies of every descriptor
/// between its fork and its exec: give such a copy a moment to go away.
fn closed(peer: &std::os::unix::net::UnixStream) -> bool {
    use std::io::Read;
    peer.set_nonblocking(true).expect("nb");
    for _ in 0..200 {
        if matches!((&*peer).read(&mut [0u8; 1]), Ok(0)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

/// The far end is open (a fork's copy can only delay a close, never cause one).
fn open(peer: &std::os::unix::net::UnixStream) -> bool {
    use std::io::Read;
    peer.set_nonblocking(true).expect("nb");
    matches!((&*peer).read(&mut [0u8; 1]), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

fn push(rr: &mut RoundRobin, gate: &Arc<Gate>, n: usize) -> Vec<std::os::unix::net::UnixStream> {
    (0..n)
        .map(|_| {
            let (c, p) = conn(gate);
            rr.push(c);
            p
        })
        .collect()
}

/// (worker, number of hand-offs) of each message.
fn shape(batches: &[Batch]) -> Vec<(u32, usize)> {
    batches.iter().map(|b| (b.worker, b.seqs.len())).collect()
}

#[test]
fn one_at_a_time_the_workers_take_turns() {
    let gate = Gate::new(0);
    let mut rr = RoundRobin::new(gate.clone(), 4);
    rr.join(1);
    rr.join(2);
    rr.join(3);
    assert_eq!(gate.limit.load(Ordering::Relaxed), 3 * WINDOW + 4);
    let mut order = Vec::new();
    let _peers: Vec<_> = (0..6)
        .map(|_| {
            let (c, p) = conn(&gate);
            rr.push(c);
            let b = rr.next_batches();
            assert_eq!(b.len(), 1);
            order.push(b[0].worker);
            rr.ack(b[0].worker, b[0].seqs[0], true)
                .expect("ack")
                .expect("the message is answered");
            p
        })
        .collect();
    assert_eq!(order, vec![1, 2, 3, 1, 2, 3]);
    assert!(rr.is_idle());
    assert_eq!(gate.outstanding(), 0);
}

#[test]
fn a_burst_goes_round_robin_in_one_message_per_worker() {
    let gate = Gate::new(0);
    let mut rr = RoundRobin::new(gate.clone(), 4);
    rr.join(1);
    rr.join(2);
    let peers = push(&mut rr, &gate, 5);
    let b = rr.next_batches();
    assert_eq!(shape(&b), vec![(1, 3), (2, 2)]);
    // Turn by turn: 1 took the 1st, 3rd and 5th connections.
    assert_eq!(b[0].seqs, vec![1, 3, 5]);
    assert_eq!(b[1].seqs, vec![2, 4]);
    assert_eq!(b[0].id, 1);
    assert_eq!(b[0].fds.len(), 3);
    let (first, ids) = (b[0].seqs.clone(), (b[0].id, b[1].id));
    drop(b);
    assert_eq!(rr.ack(1, first[0], true), Ok(None));
    assert!(
        closed(&peers[0]),
        "the primary's copy is closed after the ack"
    );
    assert!(open(&peers[2]), "not the others'");
    assert_eq!(rr.ack(1, first[1], true), Ok(None));
    assert_eq!(rr.ack(1, first[2], true), Ok(Some(ids.0)));
    assert_eq!(gate.outstanding(), 2);
}

#[test]
fn a_window_per_worker_and_the_rest_waits() {
    let gate = Gate::new(0);
    let mut rr = RoundRobin::new(gate.clone(), 4);
    rr.join(1);
    rr.join(2);
    let _peers = push(&mut rr, &gate, 2 * WINDOW + 3);
    let b = rr.next_batches();
    let per_worker = |w: u32| -> usize {
        b.iter()
            .filter(|b| b.worker == w)
            .map(|b| b.seqs.len())
            .sum()
    };
    assert_eq!((per_worker(1), per_worker(2)), (WINDOW, WINDOW));
    assert!(b.iter().all(|b| b.seqs.len() <= BATCH));
    assert_eq!(rr.pending(), 3);
    assert!(rr.next_batches().is_empty(), "every window is full");
    let seq = b[0].seqs[0];
    drop(b);
    rr.ack(1, seq, true).expect("ack");
    assert_eq!(shape(&rr.next_batches()), vec![(1, 1)]);
}

#[test]
fn strict_turns_and_a_worker_with_a_full_window_is_skipped() {
    let gate = Gate::new(0);
    let mut rr = RoundRobin::new(gate.clone(), 4);
    rr.join(1);
    rr.join(2);
    let _peers = push(&mut rr, &gate, 4);
    let b = rr.next_batches();
    assert_eq!(shape(&b), vec![(1, 2), (2, 2)]);
    // 2 answers, 1 does not: turns stay strict while 1 has room.
    for &seq in &b[1].seqs {
        rr.ack(2, seq, true).expect("ack");
    }
    let _more = push(&mut rr, &gate, 2 * WINDOW);
    let b = rr.next_batches();
    let to = |w: u32| -> usize {
        b.iter()
            .filter(|b| b.worker == w)
            .map(|b| b.seqs.len())
            .sum()
    };
    // 1 fills its window (2 already in flight), 2 takes its turns and then the rest.
    assert_eq!((to(1), to(2)), (WINDOW - 2, WINDOW));
    assert_eq!(rr.pending(), 2);
}

#[test]
fn a_worker_that_stops_answering_is_skipped_after_a_while() {
    let gate = Gate::new(0);
    let mut rr = RoundRobin::new(gate.clone(), 4);
    rr.join(1);
    rr.join(2);
    let t0 = Instant::now();
    let _peers = push(&mut rr, &gate, 2);
    let b = rr.next_batches_at(t0);
    assert_eq!(shape(&b), vec![(1, 1), (2, 1)]);
    // 2 answers; 1 is silent. Within STALL, 1 still gets its turns.
    rr.ack(2, b[1].seqs[0], true).expect("ack");
    let _more = push(&mut rr, &gate, 2);
    let b = rr.next_batches_at(t0);
    assert_eq!(shape(&b), vec![(1, 1), (2, 1)]);
    rr.ack(2, b[1].seqs[0], true).expect("ack");
    // Past it, 1 gets nothing while 2, which answers, takes everything.
    let _more = push(&mut rr, &gate, 3);
    let later = Instant::now() + STALL;
    assert_eq!(shape(&rr.next_batches_at(later)), vec![(2, 3)]);
}

#[test]
fn a_refused_connection_goes_to_another_worker_and_one_every_worker_refuses_is_closed() {
    let gate = Gate::new(0);
    let mut rr = RoundRobin::new(gate.clone(), 4);
    rr.join(1);
    rr.join(2);
    let (c, peer) = conn(&gate);
    rr.push(c);
    let b = rr.next_batches();
    assert_eq!(shape(&b), vec![(1, 1)]);
    let seq = b[0].seqs[0];
    drop(b);
    rr.ack(1, seq, false).expect("refused");
    let b = rr.next_batches();
    assert_eq!(shape(&b), vec![(2, 1)]);
    let seq = b[0].seqs[0];
    drop(b);
    rr.ack(2, seq, false).expect("refused");
    assert!(rr.next_batches().is_empty());
    assert!(closed(&peer));
    assert_eq!(rr.refused_closed, 1);
    assert!(rr.is_idle());
    assert_eq!(gate.outstanding(), 0);
}

#[test]
fn a_worker_that_leaves_mid_handoff_loses_nothing() {
    let gate = Gate::new(0);
    let mut rr = RoundRobin::new(gate.clone(), 4);
    rr.join(1);
    let peers = push(&mut rr, &gate, 3);
    let b = rr.next_batches();
    assert_eq!(shape(&b), vec![(1, 3)]);
    drop(b);
    rr.leave(1);
    assert!(peers.iter().all(open));
    rr.join(2);
    let b = rr.next_batches();
    assert_eq!(shape(&b), vec![(2, 3)]);
    assert_eq!(b[0].seqs, vec![4, 5, 6], "new numbers, same order");
}

#[test]
fn an_expired_message_goes_elsewhere_and_pauses_the_silent_worker() {
    let gate = Gate::new(0);
    let mut rr = RoundRobin::new(gate.clone(), 4);
    rr.join(1);
    rr.join(2);
    let _peers = push(&mut rr, &gate, 3);
    let b = rr.next_batches();
    assert_eq!(shape(&b), vec![(1, 2), (2, 1)]);
    let (late, id, two) = (b[0].seqs.clone(), b[0].id, b[1].seqs[0]);
    drop(b);
    // 1 answered one of its two in time.
    rr.ack(1, late[0], true).expect("ack");
    assert!(!rr.expire(2, id), "not 2's message");
    assert!(rr.expire(1, id));
    assert!(!rr.expire(1, id), "only once");
    let b = rr.next_batches();
    assert_eq!(shape(&b), vec![(2, 1)], "1 is paused");
    let moved = b[0].seqs[0];
    drop(b);
    // A late answer from the silent worker is refused and changes nothing.
    assert_eq!(
        rr.ack(1, late[1], true),
        Err(UnknownHandoff {
            worker: 1,
            seq: late[1]
        })
    );
    rr.ack(2, two, true).expect("ack");
    rr.ack(2, moved, true).expect("ack");
    let _more = push(&mut rr, &gate, 1);
    assert_eq!(
        shape(&rr.next_batches()),
        vec![(2, 1)],
        "paused 1 is skipped"
    );
    rr.resume(1);
    let _more = push(&mut rr, &gate, 2);
    assert_eq!(
        shape(&rr.next_batches()),
        vec![(2, 1), (1, 1)],
        "1 is back, at the end of the turn"
    );
}

#[test]
fn forged_and_duplicate_answers_are_refused() {
    let gate = Gate::new(0);
    let mut rr = RoundRobin::new(gate.clone(), 4);
    rr.join(1);
    rr.join(2);
    assert!(rr.ack(1, 77, true).is_err(), "never sent");
    let _peers = push(&mut rr, &gate, 2);
    let b = rr.next_batches();
    let (one, two) = (b[0].seqs[0], b[1].seqs[0]);
    drop(b);
    assert!(rr.ack(1, two, true).is_err(), "another worker's");
    assert!(rr.ack(1, one + 10, true).is_err(), "wrong number");
    rr.ack(1, one, true).expect("right number");
    assert!(rr.ack(1, one, true).is_err(), "twice");
    assert!(rr.ack(9, two, true).is_err(), "not a member");
    assert!(!rr.expire(9, two), "not a member's message");
    rr.ack(2, two, true).expect("still 2's");
}

#[test]
fn a_retired_worker_keeps_its_handoffs_until_it_answers() {
    let gate = Gate::new(0);
    let mut rr = RoundRobin::new(gate.clone(), 4);
    rr.join(1);
    rr.join(2);
    let _peers = push(&mut rr, &gate, 1);
    let b = rr.next_batches();
    assert_eq!(shape(&b), vec![(1, 1)]);
    let seq = b[0].seqs[0];
    drop(b);
    rr.retire(1);
    assert!(
        rr.next_batches().is_empty(),
        "not given to another worker while 1 may take it"
    );
    rr.ack(1, seq, false).expect("1 refuses while stopping");
    let b = rr.next_batches();
    assert_eq!(shape(&b), vec![(2, 1)], "now to 2");
    rr.ack(2, b[0].seqs[0], true).expect("ack");
    let _more = push(&mut rr, &gate, 2);
    assert_eq!(
        shape(&rr.next_batches()),
        vec![(2, 2)],
        "1 gets nothing new"
    );
}

#[test]
fn a_full_queue_pauses_and_requeues() {
    let gate = Gate::new(0);
    let mut rr = RoundRobin::new(gate.clone(), 4);
    rr.join(1);
    rr.join(2);
    let _peers = push(&mut rr, &gate, 2);
    let b = rr.next_batches();
    assert_eq!(shape(&b), vec![(1, 1), (2, 1)]);
    let (one, two) = (b[0].id, b[1].id);
    drop(b);
    rr.not_sent(1, one, true);
    rr.not_sent(2, two, false);
    assert_eq!(rr.members().collect::<Vec<_>>(), vec![1]);
    assert!(rr.next_batches().is_empty(), "1 is paused, 2 is gone");
    assert_eq!(rr.pending(), 2);
    rr.resume(1);
    assert_eq!(shape(&rr.next_batches()), vec![(1, 2)]);
}

#[test]
fn close_pending_forgets_everything() {
    let gate = Gate::new(0);
    let mut rr = RoundRobin::new(gate.clone(), 4);
    rr.join(1);
    let peers = push(&mut rr, &gate, WINDOW + 2);
    drop(rr.next_batches());
    assert_eq!(rr.close_pending(), WINDOW + 2);
    assert!(rr.is_idle());
    assert!(peers.iter().all(closed));
    assert_eq!(gate.outstanding(), 0);
    let _more = push(&mut rr, &gate, 1);
    assert_eq!(
        shape(&rr.next_batches()),
        vec![(1, 1)],
        "a full window again"
    );
}
