//! Tests of [`Socket`](super::Socket), [`connect`](crate::net::connect) and
//! [`Socket::from_fd`](super::Socket::from_fd), over loopback.

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use socket2::SockRef;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener};

use super::*;
use crate::net::{ConnectError, ConnectOptions, Lookup, LookupOptions, hints};

const LIMIT: Duration = Duration::from_secs(10);

/// Awaits `f`, failing the test if it takes longer than [`LIMIT`].
async fn within<F: Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(LIMIT, f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// Whether `f` is still pending after `wait`.
async fn still_pending<F: Future>(wait: Duration, f: F) -> bool {
    tokio::time::timeout(wait, f).await.is_err()
}

async fn listener_v4() -> (TcpListener, u16) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = l.local_addr().expect("addr").port();
    (l, port)
}

fn ipv6_loopback_works() -> bool {
    std::net::TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).is_ok()
}

/// A client [`Socket`] connected to 127.0.0.1, and the server's end as a tokio stream.
async fn client_and_peer() -> (Socket, TcpStream) {
    let (l, port) = listener_v4().await;
    let (client, accepted) = within("connect", async {
        tokio::join!(Socket::connect((port, "127.0.0.1")), l.accept())
    })
    .await;
    (client.expect("connect"), accepted.expect("accept").0)
}

/// Both ends as [`Socket`]s: (client, accepted).
async fn socket_pair() -> (Socket, Socket) {
    let (client, peer) = client_and_peer().await;
    (client, Socket::tcp(peer))
}

async fn read_all(stream: &mut (impl AsyncReadExt + Unpin)) -> Vec<u8> {
    let mut out = Vec::new();
    within("read to end", stream.read_to_end(&mut out))
        .await
        .expect("read to end");
    out
}

#[test]
fn socket_has_the_traits_the_server_needs() {
    fn check<T: AsyncRead + AsyncWrite + Unpin + Send + Sync + fmt::Debug + 'static>() {}
    check::<Socket>();
    fn send<T: Send>(_: &T) {}
    send(&Socket::connect(1));
    send(&crate::net::connect(1));
}

#[tokio::test]
async fn connect_by_port_and_host_reports_addresses_and_echoes() {
    let (l, port) = listener_v4().await;
    let server = tokio::spawn(async move {
        let (s, peer) = l.accept().await.expect("accept");
        let (mut r, mut w) = s.into_split();
        tokio::io::copy(&mut r, &mut w).await.expect("echo");
        peer
    });
    let mut client = within("connect", crate::net::connect((port, "127.0.0.1")))
        .await
        .expect("connect");
    assert_eq!(client.ready_state(), ReadyState::Open);
    assert!(!client.connecting() && !client.pending() && !client.destroyed());
    assert_eq!(client.socket_type(), Some(SocketType::Tcp4));
    assert_eq!(
        client.remote_address(),
        Some(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
    );
    assert_eq!(client.remote_port(), Some(port));
    assert_eq!(client.remote_family(), Some("IPv4"));
    assert_eq!(client.local_family(), Some("IPv4"));
    let local = client.local_address().expect("local");
    assert_eq!(client.local_port(), Some(local.port()));
    assert_eq!(
        client.address(),
        Some(AddressInfo {
            address: IpAddr::V4(Ipv4Addr::LOCALHOST),
            family: "IPv4",
            port: local.port(),
        })
    );
    client.write_all(b"hello").await.expect("write");
    let mut buf = [0u8; 5];
    within("echo", client.read_exact(&mut buf))
        .await
        .expect("echo");
    assert_eq!(&buf, b"hello");
    client.end(None).await.expect("end");
    assert!(read_all(&mut client).await.is_empty());
    let peer = within("server", server).await.expect("server task");
    assert_eq!(peer, local);
    assert!(!within("close", client.closed()).await);
}

#[tokio::test]
async fn create_connection_with_options_and_socket_address_shapes() {
    let (l, port) = listener_v4().await;
    let accept = tokio::spawn(async move {
        for _ in 0..2 {
            let _ = l.accept().await.expect("accept");
        }
    });
    let a = within(
        "options",
        crate::net::create_connection(ConnectOptions::port(port).host("127.0.0.1")),
    )
    .await
    .expect("options");
    let b = within(
        "socket address",
        crate::net::create_connection(SocketAddr::from((Ipv4Addr::LOCALHOST, port))),
    )
    .await
    .expect("socket address");
    assert_eq!(a.remote_port(), Some(port));
    assert_eq!(b.remote_port(), Some(port));
    within("accepts", accept).await.expect("accept task");
}

#[tokio::test]
async fn host_defaults_to_localhost() {
    // Listen on every address of the port (dual stack when there is IPv6), so whichever
    // address "localhost" resolves to first reaches this listener.
    let l = match TcpListener::bind((Ipv6Addr::UNSPECIFIED, 0)).await {
        Ok(l) => l,
        Err(_) => TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0))
            .await
            .expect("bind"),
    };
    let port = l.local_addr().expect("addr").port();
    let (client, accepted) = within("connect", async {
        tokio::join!(crate::net::connect(port), l.accept())
    })
    .await;
    let client = client.expect("connect to localhost");
    accepted.expect("accept");
    let remote = client.remote_address().expect("remote");
    assert!(remote.ip().is_loopback() || remote.ip().to_canonical().is_loopback());
    assert_eq!(remote.port(), port);
}

#[tokio::test]
async fn connect_refused_names_the_address_and_destroys_with_error() {
    let (l, port) = listener_v4().await;
    drop(l);
    let err = within("refused", Socket::connect((port, "127.0.0.1")))
        .await
        .expect_err("nobody listens");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
    assert!(
        err.to_string()
            .starts_with(&format!("connect 127.0.0.1:{port}: ")),
        "{err}"
    );
    let inner = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<ConnectError>())
        .expect("a ConnectError inside");
    assert_eq!(inner.errno(), Some(libc::ECONNREFUSED));
    assert_eq!(inner.address, format!("127.0.0.1:{port}"));

    // The same through start_connect: the socket is then destroyed, closed with an error.
    let mut socket = Socket::new();
    socket.start_connect((port, "127.0.0.1")).expect("start");
    let err = within("refused", socket.connected())
        .await
        .expect_err("refused");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
    assert!(socket.destroyed());
    assert_eq!(socket.ready_state(), ReadyState::Closed);
    assert!(within("close", socket.closed()).await, "had_error");
}

#[tokio::test]
async fn invalid_options_fail_before_connecting() {
    let err = Socket::connect(ConnectOptions::port(1).family(5))
        .await
        .expect_err("family");
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    assert!(err.to_string().contains("family"), "{err}");
    let mut socket = Socket::new();
    let err = socket
        .start_connect(ConnectOptions::default())
        .expect_err("nothing to connect to");
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    assert!(!socket.connecting() && socket.pending());
}

#[tokio::test]
async fn custom_lookup_is_used_and_lookup_event_gets_its_arguments() {
    let (l, port) = listener_v4().await;
    let asked = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let lookup = {
        let asked = asked.clone();
        Lookup::new(move |host, options| {
            asked.lock().expect("lock").push((host, options));
            async { Ok(vec![IpAddr::V4(Ipv4Addr::LOCALHOST)]) }
        })
    };
    let options = {
        let seen = seen.clone();
        ConnectOptions::port(port)
            .host("service.test")
            .hints(hints::ADDRCONFIG)
            .lookup(lookup)
            .on_lookup(move |event| {
                seen.lock().expect("lock").push((
                    event.error.map(ToString::to_string),
                    event.address,
                    event.family,
                    event.host.to_owned(),
                ));
            })
    };
    let (client, accepted) = within("connect", async {
        tokio::join!(Socket::connect(options), l.accept())
    })
    .await;
    let client = client.expect("connect through the custom lookup");
    accepted.expect("accept");
    assert_eq!(client.remote_port(), Some(port));
    assert_eq!(
        *asked.lock().expect("lock"),
        vec![(
            "service.test".to_owned(),
            LookupOptions {
                family: 0,
                hints: hints::ADDRCONFIG
            }
        )]
    );
    assert_eq!(
        *seen.lock().expect("lock"),
        vec![(
            None,
            Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            Some(4),
            "service.test".to_owned()
        )]
    );
}

#[tokio::test]
async fn failed_lookup_is_the_connect_error_and_the_lookup_event() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let options = {
        let seen = seen.clone();
        ConnectOptions::port(80)
            .host("nowhere.test")
            .lookup(Lookup::new(|_, _| async {
                Err(io::Error::new(io::ErrorKind::NotFound, "no such host"))
            }))
            .on_lookup(move |event| {
                seen.lock().expect("lock").push((
                    event.error.map(|e| (e.kind(), e.to_string())),
                    event.address,
                    event.family,
                    event.host.to_owned(),
                ));
            })
    };
    let err = within("lookup", Socket::connect(options))
        .await
        .expect_err("lookup fails");
    assert_eq!(err.kind(), io::ErrorKind::NotFound);
    assert!(err.to_string().contains("\"nowhere.test\""), "{err}");
    assert!(err.to_string().contains("no such host"), "{err}");
    let seen = seen.lock().expect("lock");
    assert_eq!(seen.len(), 1);
    let (error, address, family, host) = &seen[0];
    assert_eq!(
        error.as_ref().map(|(kind, text)| (*kind, text.clone())),
        Some((io::ErrorKind::NotFound, err.to_string()))
    );
    assert_eq!(
        (*address, *family, host.as_str()),
        (None, None, "nowhere.test")
    );
}

#[tokio::test]
async fn an_ip_address_needs_no_lookup() {
    let (l, port) = listener_v4().await;
    let called = Arc::new(Mutex::new(0));
    let options = {
        let (a, b) = (called.clone(), called.clone());
        ConnectOptions::port(port)
            .host("127.0.0.1")
            .lookup(Lookup::new(move |_, _| {
                *a.lock().expect("lock") += 1;
                async { Ok(vec![]) }
            }))
            .on_lookup(move |_| *b.lock().expect("lock") += 1)
    };
    let (client, _accepted) = within("connect", async {
        tokio::join!(Socket::connect(options), l.accept())
    })
    .await;
    client.expect("connect");
    assert_eq!(*called.lock().expect("lock"), 0);
}

#[tokio::test]
async fn family_selects_ipv4_or_ipv6_addresses_of_the_host() {
    if !ipv6_loopback_works() {
        eprintln!("skipped: no IPv6 loopback here");
        return;
    }
    let l4 = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("v4");
    let port = l4.local_addr().expect("addr").port();
    let Ok(l6) = TcpListener::bind((Ipv6Addr::LOCALHOST, port)).await else {
        eprintln!("skipped: port {port} is taken on ::1");
        return;
    };
    let both = Lookup::new(|_, options: LookupOptions| async move {
        let all = vec![
            IpAddr::V6(Ipv6Addr::LOCALHOST),
            IpAddr::V4(Ipv4Addr::LOCALHOST),
        ];
        // A resolver honouring the family, as dns.lookup does.
        Ok(all
            .into_iter()
            .filter(|ip| match options.family {
                4 => ip.is_ipv4(),
                6 => ip.is_ipv6(),
                _ => true,
            })
            .collect())
    });
    for (family, listener, name) in [(4u8, &l4, "IPv4"), (6, &l6, "IPv6")] {
        let options = ConnectOptions::port(port)
            .host("dual.test")
            .family(family)
            .lookup(both.clone());
        let (client, accepted) = within("connect", async {
            tokio::join!(Socket::connect(options), listener.accept())
        })
        .await;
        let client = client.expect("connect");
        accepted.expect("accept");
        assert_eq!(client.remote_family(), Some(name), "family {family}");
        assert_eq!(client.local_family(), Some(name));
        let expected = if family == 4 {
            SocketType::Tcp4
        } else {
            SocketType::Tcp6
        };
        assert_eq!(client.socket_type(), Some(expected));
    }
    // A resolver that ignores the family is filtered: family 6 gets no IPv4 address.
    let v4_only = Lookup::new(|_, _| async { Ok(vec![IpAddr::V4(Ipv4Addr::LOCALHOST)]) });
    let err = Socket::connect(
        ConnectOptions::port(port)
            .host("v4only.test")
            .family(6)
            .lookup(v4_only),
    )
    .await
    .expect_err("no IPv6 address");
    assert_eq!(err.kind(), io::ErrorKind::NotFound);
    assert!(err.to_string().contains("no IPv6 address"), "{err}");
}

#[tokio::test]
async fn local_address_and_local_port_are_bound() {
    let (l, port) = listener_v4().await;
    // Find a free local port; another test may take it between the probe and the bind, so try
    // a few times.
    let mut bound = None;
    for _ in 0..5 {
        let free = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("probe")
            .local_addr()
            .expect("addr")
            .port();
        let options = ConnectOptions::port(port)
            .host("127.0.0.1")
            .local_address(IpAddr::V4(Ipv4Addr::LOCALHOST))
            .local_port(free);
        let (client, accepted) = within("connect", async {
            tokio::join!(Socket::connect(options), l.accept())
        })
        .await;
        match client {
            Ok(client) => {
                let (_, peer) = accepted.expect("accept");
                bound = Some((client, free, peer));
                break;
            }
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
            Err(e) => panic!("connect from local port {free}: {e}"),
        }
    }
    let (client, free, peer) = bound.expect("a free local port within five tries");
    assert_eq!(client.local_port(), Some(free));
    assert_eq!(peer, SocketAddr::from((Ipv4Addr::LOCALHOST, free)));

    // A local port in use (by a listener) is AddrInUse naming the local address.
    let taken = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let err = Socket::connect(
        ConnectOptions::port(port)
            .host("127.0.0.1")
            .local_address(IpAddr::V4(Ipv4Addr::LOCALHOST))
            .local_port(port),
    )
    .await
    .expect_err("port in use");
    assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
    assert!(err.to_string().contains(&format!("from {taken}")), "{err}");

    // A local address of the other family than the target's.
    let err = Socket::connect(
        ConnectOptions::port(port)
            .host("127.0.0.1")
            .local_address(IpAddr::V6(Ipv6Addr::LOCALHOST)),
    )
    .await
    .expect_err("family mismatch");
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    assert!(err.to_string().contains("local address ::1"), "{err}");
}

#[tokio::test]
async fn unix_path_connect_and_its_errors() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("echo.sock");
    let l = UnixListener::bind(&path).expect("bind");
    let server = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.expect("accept");
        s.write_all(b"hi").await.expect("write");
    });
    let mut client = within("connect", crate::net::connect(path.as_path()))
        .await
        .expect("connect");
    assert_eq!(client.socket_type(), Some(SocketType::Unix));
    assert_eq!(client.ready_state(), ReadyState::Open);
    assert_eq!(client.remote_address(), None);
    assert_eq!(client.address(), None);
    assert_eq!(read_all(&mut client).await, b"hi");
    within("server", server).await.expect("server");

    let missing = dir.path().join("missing.sock");
    let err = Socket::connect(ConnectOptions::path(&missing))
        .await
        .expect_err("no such socket");
    assert_eq!(err.kind(), io::ErrorKind::NotFound);
    assert!(
        err.to_string()
            .starts_with(&format!("connect {}: ", missing.display())),
        "{err}"
    );
}

#[tokio::test]
async fn write_reports_flushed_or_queued_and_drained_follows() {
    let (mut client, mut peer) = client_and_peer().await;
    assert!(client.write(b"first").expect("write"), "goes straight out");
    assert_eq!(client.buffer_size(), 0);
    // Fill the kernel's buffers: the peer reads nothing yet.
    let chunk = vec![7u8; 256 * 1024];
    let mut total = 5u64;
    let mut queued = false;
    for _ in 0..4096 {
        total += chunk.len() as u64;
        if !client.write(&chunk).expect("write") {
            queued = true;
            break;
        }
    }
    assert!(queued, "write never returned false");
    assert!(client.buffer_size() > 0);
    assert_eq!(client.bytes_written() + client.buffer_size() as u64, total);
    // While nobody reads, drained does not complete.
    assert!(still_pending(Duration::from_millis(100), client.drained()).await);
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.expect("read");
        got
    });
    within("drain", client.drained()).await.expect("drain");
    assert_eq!(client.buffer_size(), 0);
    assert_eq!(client.bytes_written(), total);
    // AsyncWrite after the queue keeps the order.
    client.write_all(b"last").await.expect("write_all");
    client.end(None).await.expect("end");
    let got = within("reader", reader).await.expect("reader");
    assert_eq!(got.len() as u64, total + 4);
    assert_eq!(&got[..5], b"first");
    assert_eq!(&got[got.len() - 4..], b"last");
    assert!(got[5..got.len() - 4].iter().all(|b| *b == 7));
}

#[tokio::test]
async fn queued_bytes_go_before_async_writes() {
    let (mut client, mut peer) = client_and_peer().await;
    let big = vec![1u8; 8 * 1024 * 1024];
    let _ = client.write(&big).expect("write");
    let queued = client.buffer_size();
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.expect("read");
        got
    });
    // No explicit drained(): poll_write must send the queue first.
    within("write_all", client.write_all(b"\x02\x02"))
        .await
        .expect("write_all");
    within("shutdown", client.shutdown())
        .await
        .expect("shutdown");
    let got = within("reader", reader).await.expect("reader");
    assert_eq!(got.len(), big.len() + 2);
    assert!(
        got[..big.len()].iter().all(|b| *b == 1),
        "queued {queued} bytes reordered"
    );
    assert_eq!(&got[big.len()..], b"\x02\x02");
}

#[tokio::test]
async fn end_half_closes_and_the_peer_can_still_answer() {
    let (mut client, mut peer) = client_and_peer().await;
    client.end(Some(b"bye")).await.expect("end with data");
    assert_eq!(client.ready_state(), ReadyState::ReadOnly);
    assert!(!client.destroyed());
    assert_eq!(read_all(&mut peer).await, b"bye", "peer reads up to EOF");
    peer.write_all(b"answer").await.expect("answer");
    let mut buf = [0u8; 6];
    within("answer", client.read_exact(&mut buf))
        .await
        .expect("read answer");
    assert_eq!(&buf, b"answer");
    let err = client.write(b"more").expect_err("write after end");
    assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    assert_eq!(err.to_string(), "write after end");
    client.end(None).await.expect("ending twice is fine");
    drop(peer);
    assert!(read_all(&mut client).await.is_empty());
    assert!(client.destroyed(), "both sides ended: closed");
    assert_eq!(client.ready_state(), ReadyState::Closed);
    assert_eq!(client.read(&mut buf).await.expect("EOF again"), 0);
    assert!(!within("close", client.closed()).await);
}

#[tokio::test]
async fn without_allow_half_open_the_end_of_the_peer_ends_the_socket() {
    let (mut peer, server_side) = client_and_peer().await;
    let mut socket = Socket::tcp(server_side);
    assert!(!socket.allow_half_open());
    peer.write_all(b"req").await.expect("write");
    peer.shutdown().await.expect("peer FIN");
    assert_eq!(read_all(&mut socket).await, b"req");
    // The socket answered the FIN with its own: the peer sees the end of the stream.
    assert!(read_all(&mut peer).await.is_empty());
    assert!(socket.destroyed());
    let err = socket.write(b"late").expect_err("ended by the peer");
    assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    assert!(
        err.to_string().contains("ended by the other party"),
        "{err}"
    );
    assert!(!within("close", socket.closed()).await);
}

#[tokio::test]
async fn with_allow_half_open_the_socket_stays_writable() {
    let (mut peer, server_side) = client_and_peer().await;
    let mut socket = Socket::tcp(server_side);
    socket.set_allow_half_open(true);
    peer.shutdown().await.expect("peer FIN");
    assert!(read_all(&mut socket).await.is_empty());
    assert_eq!(socket.ready_state(), ReadyState::WriteOnly);
    assert!(!socket.destroyed());
    assert!(socket.write(b"still here").expect("write"));
    socket.end(None).await.expect("end");
    assert!(socket.destroyed(), "both sides ended");
    assert_eq!(read_all(&mut peer).await, b"still here");
    assert!(!within("close", socket.closed()).await);
}

#[tokio::test]
async fn auto_end_sends_the_queue_before_fin() {
    let (mut peer, server_side) = client_and_peer().await;
    let mut socket = Socket::tcp(server_side);
    let big = vec![9u8; 8 * 1024 * 1024];
    assert!(!socket.write(&big).expect("write"), "queued");
    peer.shutdown().await.expect("peer FIN");
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.expect("read");
        got
    });
    assert!(read_all(&mut socket).await.is_empty());
    // The FIN waits for the queue; closed() drives it.
    assert!(!within("close", socket.closed()).await);
    let got = within("reader", reader).await.expect("reader");
    assert_eq!(got.len(), big.len());
}

#[tokio::test]
async fn destroy_closes_and_destroy_with_error_reports_it() {
    let (mut client, mut peer) = client_and_peer().await;
    client.destroy(None);
    assert!(client.destroyed());
    assert_eq!(client.ready_state(), ReadyState::Closed);
    assert_eq!(client.remote_address(), None);
    assert!(read_all(&mut peer).await.is_empty(), "peer sees the end");
    let err = client.write(b"x").expect_err("destroyed");
    assert_eq!(err.kind(), io::ErrorKind::NotConnected);
    let mut buf = [0u8; 1];
    let err = client.read(&mut buf).await.expect_err("destroyed");
    assert_eq!(err.kind(), io::ErrorKind::NotConnected);
    assert!(!within("close", client.closed()).await);

    let (mut client, _peer) = client_and_peer().await;
    client.destroy(Some(io::Error::other("bad frame")));
    client.destroy(Some(io::Error::other("ignored: already destroyed")));
    assert!(within("close", client.closed()).await, "had_error");
    let err = client.read(&mut buf).await.expect_err("the 'error' event");
    assert_eq!(err.to_string(), "bad frame");
    assert!(client.take_error().is_none(), "reported once");

    let (mut client, _peer) = client_and_peer().await;
    client.destroy(Some(io::Error::other("taken")));
    assert_eq!(
        client.take_error().map(|e| e.to_string()).as_deref(),
        Some("taken")
    );
}

#[tokio::test]
async fn reset_and_destroy_makes_the_peer_see_econnreset() {
    let (mut client, server_side) = socket_pair().await;
    let mut server_side = server_side;
    server_side.reset_and_destroy().expect("reset");
    assert!(server_side.destroyed());
    let mut buf = [0u8; 16];
    let err = within("read", client.read(&mut buf))
        .await
        .expect_err("reset by peer");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    assert!(client.destroyed());
    assert!(within("close", client.closed()).await, "had_error");

    // On a socket with no connection it is destroy with an error.
    let mut never = Socket::new();
    never.reset_and_destroy().expect("no connection");
    assert!(never.destroyed());
    assert_eq!(
        never.take_error().map(|e| e.to_string()).as_deref(),
        Some("socket is closed")
    );
}

#[tokio::test]
async fn reset_and_destroy_while_connecting_resets_once_connected() {
    let (l, port) = listener_v4().await;
    let mut socket = Socket::new();
    socket.start_connect((port, "127.0.0.1")).expect("start");
    socket.reset_and_destroy().expect("reset later");
    let (connected, accepted) = within("connect", async {
        tokio::join!(socket.connected(), l.accept())
    })
    .await;
    let err = connected.expect_err("reset");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
    assert!(socket.destroyed());
    let (mut peer, _) = accepted.expect("accept");
    let mut buf = [0u8; 1];
    let err = within("read", peer.read(&mut buf))
        .await
        .expect_err("reset by peer");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
}

#[tokio::test]
async fn reset_and_destroy_on_a_unix_socket_is_an_error() {
    let (a, _b) = UnixStream::pair().expect("pair");
    let mut socket = Socket::unix(a);
    let err = socket.reset_and_destroy().expect_err("unix");
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    assert!(err.to_string().contains("TCP"), "{err}");
    assert!(!socket.destroyed());
    assert_eq!(socket.ready_state(), ReadyState::Open);
}

#[tokio::test]
async fn paused_sockets_deliver_nothing_until_resumed() {
    let (mut client, mut peer) = client_and_peer().await;
    client.pause();
    assert!(client.is_paused());
    peer.write_all(b"data").await.expect("write");
    let mut buf = [0u8; 4];
    assert!(still_pending(Duration::from_millis(150), client.read(&mut buf)).await);
    assert_eq!(client.bytes_read(), 0);
    client.resume();
    within("read", client.read_exact(&mut buf))
        .await
        .expect("read");
    assert_eq!(&buf, b"data");
    assert_eq!(client.bytes_read(), 4);
}

#[tokio::test]
async fn set_timeout_notifies_idleness_without_closing() {
    let (mut client, mut peer) = client_and_peer().await;
    assert_eq!(client.timeout(), None);
    client.set_timeout(Duration::from_millis(100));
    assert_eq!(client.timeout(), Some(Duration::from_millis(100)));
    let idle = client.idle_timeout();
    within("timeout", idle.expired()).await;
    // Only a notification: the socket still works both ways.
    assert_eq!(client.ready_state(), ReadyState::Open);
    assert!(client.write(b"ping").expect("write"));
    let mut buf = [0u8; 4];
    within("read", peer.read_exact(&mut buf))
        .await
        .expect("read");
    // One event per idle period: without activity there is no second one...
    assert!(still_pending(Duration::from_millis(50), idle.expired()).await);
    // ...activity (the write above was one) starts a new period.
    within("timeout again", idle.expired()).await;
    peer.write_all(b"pong").await.expect("write");
    within("read", client.read_exact(&mut buf))
        .await
        .expect("read");
    within("timeout after a read", idle.expired()).await;

    // In a select next to reads, after new activity (this write).
    assert!(client.write(b"x").expect("write"));
    let mut got_timeout = false;
    tokio::select! {
        n = client.read(&mut buf) => panic!("nothing was sent, read {n:?}"),
        () = idle.expired() => got_timeout = true,
        () = tokio::time::sleep(LIMIT) => {}
    }
    assert!(got_timeout);

    // Zero disables it.
    client.set_timeout(Duration::ZERO);
    assert_eq!(client.timeout(), None);
    assert!(still_pending(Duration::from_millis(300), idle.expired()).await);
}

#[tokio::test]
async fn connect_options_timeout_is_set_before_connecting() {
    let (l, port) = listener_v4().await;
    let options = ConnectOptions::port(port)
        .host("127.0.0.1")
        .timeout(Duration::from_millis(50));
    let (client, _accepted) = within("connect", async {
        tokio::join!(Socket::connect(options), l.accept())
    })
    .await;
    let client = client.expect("connect");
    assert_eq!(client.timeout(), Some(Duration::from_millis(50)));
    within("timeout", client.idle_timeout().expired()).await;
}

#[tokio::test]
async fn destroyed_sockets_do_not_time_out() {
    let (mut client, _peer) = client_and_peer().await;
    client.set_timeout(Duration::from_millis(50));
    let idle = client.idle_timeout();
    client.destroy(None);
    assert!(still_pending(Duration::from_millis(200), idle.expired()).await);
    client.set_timeout(Duration::from_millis(10));
    assert_eq!(
        client.timeout(),
        None,
        "set_timeout on a destroyed socket does nothing"
    );
}

fn keepalive_of(socket: &Socket) -> (bool, Duration, Duration, u32) {
    let fd = socket.fd().expect("connected");
    let sock = SockRef::from(&fd);
    (
        sock.keepalive().expect("SO_KEEPALIVE"),
        sock.tcp_keepalive_time().expect("TCP_KEEPIDLE"),
        sock.tcp_keepalive_interval().expect("TCP_KEEPINTVL"),
        sock.tcp_keepalive_retries().expect("TCP_KEEPCNT"),
    )
}

#[tokio::test]
async fn set_keep_alive_sets_the_four_socket_options() {
    let (client, _peer) = client_and_peer().await;
    client
        .set_keep_alive(true, Duration::from_millis(5_500))
        .expect("keepalive");
    assert_eq!(
        keepalive_of(&client),
        (true, Duration::from_secs(5), Duration::from_secs(1), 10)
    );
    // A delay under one second leaves TCP_KEEPIDLE as it was.
    client
        .set_keep_alive(true, Duration::from_millis(500))
        .expect("keepalive");
    assert_eq!(keepalive_of(&client).1, Duration::from_secs(5));
    client
        .set_keep_alive(false, Duration::ZERO)
        .expect("disable");
    assert!(!keepalive_of(&client).0);
}

#[tokio::test]
async fn keep_alive_and_no_delay_options_apply_on_connect() {
    let (l, port) = listener_v4().await;
    let options = ConnectOptions::port(port)
        .host("127.0.0.1")
        .no_delay(true)
        .keep_alive(true)
        .keep_alive_initial_delay(Duration::from_secs(7));
    let (client, _accepted) = within("connect", async {
        tokio::join!(Socket::connect(options), l.accept())
    })
    .await;
    let client = client.expect("connect");
    assert_eq!(
        keepalive_of(&client),
        (true, Duration::from_secs(7), Duration::from_secs(1), 10)
    );
    let fd = client.fd().expect("fd");
    assert!(SockRef::from(&fd).tcp_nodelay().expect("TCP_NODELAY"));
}

#[tokio::test]
async fn set_no_delay_toggles_tcp_nodelay_and_is_remembered_before_connect() {
    let (client, _peer) = client_and_peer().await;
    let nodelay = |s: &Socket| {
        let fd = s.fd().expect("fd");
        SockRef::from(&fd).tcp_nodelay().expect("TCP_NODELAY")
    };
    assert!(!nodelay(&client), "Nagle is on by default");
    client.set_no_delay(true).expect("set");
    assert!(nodelay(&client));
    client.set_no_delay(false).expect("unset");
    assert!(!nodelay(&client));

    let (l, port) = listener_v4().await;
    let mut pending = Socket::new();
    pending.set_no_delay(true).expect("remembered");
    pending
        .set_keep_alive(true, Duration::from_secs(3))
        .expect("remembered");
    pending.start_connect((port, "127.0.0.1")).expect("start");
    let (connected, _accepted) = within("connect", async {
        tokio::join!(pending.connected(), l.accept())
    })
    .await;
    connected.expect("connect");
    assert!(nodelay(&pending));
    assert_eq!(keepalive_of(&pending).1, Duration::from_secs(3));

    // Unix sockets have no such options: nothing happens.
    let (a, _b) = UnixStream::pair().expect("pair");
    let unix = Socket::unix(a);
    unix.set_no_delay(true).expect("no-op");
    unix.set_keep_alive(true, Duration::from_secs(1))
        .expect("no-op");
}

#[tokio::test]
async fn set_encoding_decodes_characters_split_across_writes() {
    let (mut client, mut peer) = client_and_peer().await;
    client.set_encoding(Encoding::Utf8);
    assert_eq!(client.encoding(), Some(Encoding::Utf8));
    let euro = "€".as_bytes();
    peer.write_all(&euro[..2]).await.expect("first half");
    peer.flush().await.expect("flush");
    // The first two bytes alone decode to nothing: read_text waits for the rest.
    assert!(still_pending(Duration::from_millis(100), client.read_text()).await);
    peer.write_all(&euro[2..]).await.expect("second half");
    peer.write_all("ü!".as_bytes()).await.expect("more");
    peer.shutdown().await.expect("FIN");
    let mut text = String::new();
    while let Some(chunk) = within("text", client.read_text()).await.expect("read") {
        assert!(!chunk.contains('\u{FFFD}'), "split character in {chunk:?}");
        text += &chunk;
    }
    assert_eq!(text, "€ü!");
}

#[tokio::test]
async fn other_encodings_and_bytes_held_back_reach_async_reads() {
    let (mut client, mut peer) = client_and_peer().await;
    client.set_encoding(Encoding::Hex);
    peer.write_all(b"\x01\xff").await.expect("write");
    assert_eq!(
        within("hex", client.read_text())
            .await
            .expect("read")
            .as_deref(),
        Some("01ff")
    );
    client.set_encoding(Encoding::Utf8);
    peer.write_all(&"é".as_bytes()[..1]).await.expect("half");
    assert!(still_pending(Duration::from_millis(100), client.read_text()).await);
    // The byte held by the decoder is not lost to a byte read.
    let mut byte = [0u8; 1];
    within("read", client.read_exact(&mut byte))
        .await
        .expect("read");
    assert_eq!(byte[0], "é".as_bytes()[0]);
}

#[tokio::test]
async fn ready_state_follows_the_connection() {
    let (l, port) = listener_v4().await;
    let mut socket = Socket::new();
    assert_eq!(socket.ready_state(), ReadyState::Closed);
    assert!(socket.pending() && !socket.connecting());
    socket.start_connect((port, "127.0.0.1")).expect("start");
    assert_eq!(socket.ready_state(), ReadyState::Opening);
    assert_eq!(socket.ready_state().as_str(), "opening");
    assert!(socket.pending() && socket.connecting());
    let err = socket
        .start_connect((port, "127.0.0.1"))
        .expect_err("already connecting");
    assert!(err.to_string().contains("already connecting"), "{err}");
    let (connected, accepted) = within("connect", async {
        tokio::join!(socket.connected(), l.accept())
    })
    .await;
    connected.expect("connect");
    let (mut peer, _) = accepted.expect("accept");
    assert_eq!(socket.ready_state(), ReadyState::Open);
    assert!(!socket.pending() && !socket.connecting());
    let err = socket
        .start_connect((port, "127.0.0.1"))
        .expect_err("already connected");
    assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
    socket.end(None).await.expect("end");
    assert_eq!(socket.ready_state(), ReadyState::ReadOnly);
    assert_eq!(socket.ready_state().to_string(), "readOnly");
    peer.shutdown().await.expect("peer FIN");
    assert!(read_all(&mut socket).await.is_empty());
    assert_eq!(socket.ready_state(), ReadyState::Closed);

    // A closed socket may connect again.
    let (again, accepted) = within("reconnect", async {
        let started = socket.start_connect((port, "127.0.0.1"));
        let (c, a) = tokio::join!(socket.connected(), l.accept());
        (started.and(c), a)
    })
    .await;
    again.expect("reconnect");
    accepted.expect("accept");
    assert_eq!(socket.ready_state(), ReadyState::Open);
    assert_eq!(socket.bytes_read(), 0);
}

#[tokio::test]
async fn writes_while_connecting_are_queued_then_sent() {
    let (l, port) = listener_v4().await;
    let mut socket = Socket::new();
    socket.start_connect((port, "127.0.0.1")).expect("start");
    assert!(!socket.write(b"early").expect("queued"));
    assert_eq!(socket.buffer_size(), 5);
    let (connected, accepted) = within("connect", async {
        tokio::join!(socket.connected(), l.accept())
    })
    .await;
    connected.expect("connect");
    let (mut peer, _) = accepted.expect("accept");
    within("drain", socket.drained()).await.expect("drain");
    assert_eq!(socket.buffer_size(), 0);
    let mut buf = [0u8; 5];
    within("read", peer.read_exact(&mut buf))
        .await
        .expect("read");
    assert_eq!(&buf, b"early");
}

#[tokio::test]
async fn byte_counters_count_both_ways() {
    let (mut client, mut server_side) = socket_pair().await;
    assert!(client.write(b"12345").expect("write"));
    client.write_all(b"678").await.expect("write_all");
    let mut buf = [0u8; 8];
    within("read", server_side.read_exact(&mut buf))
        .await
        .expect("read");
    assert_eq!(client.bytes_written(), 8);
    assert_eq!(server_side.bytes_read(), 8);
    server_side.end(Some(b"ab")).await.expect("end");
    assert_eq!(read_all(&mut client).await, b"ab");
    assert_eq!(client.bytes_read(), 2);
    assert_eq!(server_side.bytes_written(), 2);
}

#[tokio::test]
async fn on_read_reuses_one_buffer_until_the_end() {
    let (mut client, mut peer) = client_and_peer().await;
    peer.write_all(b"hello world").await.expect("write");
    peer.shutdown().await.expect("FIN");
    let mut buf = [0u8; 4];
    let mut got = Vec::new();
    let end = within(
        "on_read",
        client.on_read(&mut buf, |chunk| {
            assert!(chunk.len() <= 4);
            got.extend_from_slice(chunk);
            true
        }),
    )
    .await
    .expect("on_read");
    assert_eq!(end, OnReadEnd::Eof);
    assert_eq!(got, b"hello world");
    assert_eq!(client.bytes_read(), 11);
}

#[tokio::test]
async fn on_read_returning_false_pauses() {
    let (mut client, mut peer) = client_and_peer().await;
    peer.write_all(b"abcdef").await.expect("write");
    peer.shutdown().await.expect("FIN");
    let mut buf = [0u8; 3];
    let mut got = Vec::new();
    let end = within(
        "on_read",
        client.on_read(&mut buf, |chunk| {
            got.extend_from_slice(chunk);
            false
        }),
    )
    .await
    .expect("on_read");
    assert_eq!(end, OnReadEnd::Paused);
    assert!(client.is_paused());
    assert_eq!(
        client.on_read(&mut buf, |_| true).await.expect("paused"),
        OnReadEnd::Paused
    );
    client.resume();
    let end = within(
        "on_read",
        client.on_read(&mut buf, |chunk| {
            got.extend_from_slice(chunk);
            true
        }),
    )
    .await
    .expect("on_read");
    assert_eq!(end, OnReadEnd::Eof);
    assert_eq!(got, b"abcdef");
    let err = client.on_read(&mut [], |_| true).await.expect_err("empty");
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
}

#[tokio::test]
async fn split_and_copy_echo_like_the_server() {
    let (mut client, server_side) = socket_pair().await;
    let echo = tokio::spawn(async move {
        let (mut r, mut w) = tokio::io::split(server_side);
        tokio::io::copy(&mut r, &mut w).await.expect("copy");
        w.shutdown().await.expect("shutdown after auto-end is fine");
    });
    client.write_all(b"ping").await.expect("write");
    client.end(None).await.expect("end");
    assert_eq!(read_all(&mut client).await, b"ping");
    within("echo", echo).await.expect("echo task");
}

#[tokio::test]
async fn from_fd_wraps_a_connected_socket() {
    let (a, b) = std::os::unix::net::UnixStream::pair().expect("pair");
    let mut socket = Socket::from_fd(a.as_raw_fd()).expect("from fd");
    assert_eq!(socket.socket_type(), Some(SocketType::Unix));
    assert_eq!(socket.ready_state(), ReadyState::Open);
    // The socket has its own descriptor: the original may be closed.
    drop(a);
    b.set_nonblocking(true).expect("nonblocking");
    let mut peer = UnixStream::from_std(b).expect("peer");
    assert!(socket.write(b"via fd").expect("write"));
    let mut buf = [0u8; 6];
    within("read", peer.read_exact(&mut buf))
        .await
        .expect("read");
    assert_eq!(&buf, b"via fd");
    peer.write_all(b"back").await.expect("write back");
    let mut back = [0u8; 4];
    within("read", socket.read_exact(&mut back))
        .await
        .expect("read");
    assert_eq!(&back, b"back");
}

#[tokio::test]
async fn from_fd_destroy_ends_the_connection_though_the_caller_keeps_the_fd() {
    let (l, port) = listener_v4().await;
    let std_client = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let (mut peer, _) = within("accept", l.accept()).await.expect("accept");
    let mut socket =
        Socket::from_fd(FromFdOptions::new(std_client.as_raw_fd()).socket_type(SocketType::Tcp4))
            .expect("from fd");
    assert_eq!(socket.remote_port(), Some(port));
    socket.destroy(None);
    assert!(read_all(&mut peer).await.is_empty(), "peer sees the end");
    drop(std_client);
}

#[tokio::test]
async fn from_fd_readable_and_writable_options() {
    let (a, _b) = std::os::unix::net::UnixStream::pair().expect("pair");
    let mut read_only =
        Socket::from_fd(FromFdOptions::new(a.as_raw_fd()).writable(false)).expect("from fd");
    assert_eq!(read_only.ready_state(), ReadyState::ReadOnly);
    let err = read_only.write(b"x").expect_err("not writable");
    assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    assert!(err.to_string().contains("writable: false"), "{err}");

    let (c, _d) = std::os::unix::net::UnixStream::pair().expect("pair");
    let mut write_only =
        Socket::from_fd(FromFdOptions::new(c.as_raw_fd()).readable(false)).expect("from fd");
    assert_eq!(write_only.ready_state(), ReadyState::WriteOnly);
    let mut buf = [0u8; 1];
    assert_eq!(
        within("read", write_only.read(&mut buf))
            .await
            .expect("EOF"),
        0
    );
    let opts = FromFdOptions::new(c.as_raw_fd()).allow_half_open(true);
    assert!(Socket::from_fd(opts).expect("from fd").allow_half_open());
}

#[tokio::test]
async fn from_fd_rejects_what_is_not_a_connected_stream_socket() {
    let expect_err =
        |options: FromFdOptions| Socket::from_fd(options).expect_err("must be rejected");
    let file = tempfile::tempfile().expect("tempfile");
    let fd = file.as_raw_fd();
    let err = expect_err(FromFdOptions::new(fd));
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    assert_eq!(
        err.to_string(),
        format!("fd {fd} is not a socket: it is a regular file")
    );

    let err = expect_err(FromFdOptions::new(999_999));
    assert!(
        err.to_string()
            .starts_with("fd 999999 is not an open descriptor"),
        "{err}"
    );
    let err = expect_err(FromFdOptions::new(-1));
    assert!(err.to_string().starts_with("fd -1 "), "{err}");

    let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    let err = expect_err(FromFdOptions::new(udp.as_raw_fd()));
    assert!(
        err.to_string()
            .starts_with(&format!("fd {} is not a stream socket", udp.as_raw_fd())),
        "{err}"
    );

    let listening = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
    let err = expect_err(FromFdOptions::new(listening.as_raw_fd()));
    assert!(err.to_string().contains("listening socket"), "{err}");

    let unconnected =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    let err = expect_err(FromFdOptions::new(unconnected.as_raw_fd()));
    assert_eq!(err.kind(), io::ErrorKind::NotConnected);
    assert!(err.to_string().contains("not connected"), "{err}");

    let (a, _b) = std::os::unix::net::UnixStream::pair().expect("pair");
    let err = expect_err(FromFdOptions::new(a.as_raw_fd()).socket_type(SocketType::Tcp4));
    assert_eq!(
        err.to_string(),
        format!(
            "fd {} is a unix socket, not the tcp4 socket asked for",
            a.as_raw_fd()
        )
    );
    // The descriptors given were left open.
    assert!(file.metadata().is_ok());
}

#[test]
fn from_fd_outside_a_runtime_is_an_error() {
    let (a, _b) = std::os::unix::net::UnixStream::pair().expect("pair");
    let err = Socket::from_fd(a.as_raw_fd()).expect_err("no runtime");
    assert!(err.to_string().contains("tokio runtime"), "{err}");
}

#[tokio::test]
async fn not_connected_sockets_say_so() {
    let mut socket = Socket::new();
    let err = socket.write(b"x").expect_err("not connected");
    assert_eq!(err.kind(), io::ErrorKind::NotConnected);
    let mut buf = [0u8; 1];
    let err = socket.read(&mut buf).await.expect_err("not connected");
    assert_eq!(err.kind(), io::ErrorKind::NotConnected);
    let err = socket.connected().await.expect_err("not connected");
    assert_eq!(err.kind(), io::ErrorKind::NotConnected);
    assert!(!socket.closed().await);
    assert_eq!(socket.socket_type(), None);
    assert!(socket.fd().is_none());
    assert!(format!("{socket:?}").contains("closed"));
}

#[tokio::test]
#[allow(deprecated)]
async fn set_secure_is_gone() {
    let (mut client, _peer) = client_and_peer().await;
    let err = client.set_secure().expect_err("removed");
    assert_eq!(err.kind(), io::ErrorKind::Unsupported);
}

#[test]
fn socket_type_names_are_nodes() {
    assert_eq!(
        "tcp6".parse::<SocketType>().expect("parse"),
        SocketType::Tcp6
    );
    let err = "udp4".parse::<SocketType>().expect_err("unknown");
    assert!(err.to_string().contains("\"udp4\""), "{err}");
    assert_eq!(SocketType::Unix.to_string(), "unix");
}

#[tokio::test]
async fn a_handed_over_connection_ends_when_dropped_though_the_primary_keeps_its_copy() {
    let (l, port) = listener_v4().await;
    let client = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let (mut peer, _) = within("accept", l.accept()).await.expect("accept");
    // The primary's copy, kept until it hears the worker took the connection.
    let primary_copy = client.try_clone().expect("dup");
    let mut socket = Socket::from_received(std::os::fd::OwnedFd::from(client)).expect("received");
    socket.close_with_shutdown();
    socket.write(b"answer").expect("write");
    drop(socket);
    assert_eq!(
        read_all(&mut peer).await,
        b"answer",
        "the peer sees the end"
    );
    drop(primary_copy);
}

#[tokio::test]
async fn without_shutdown_a_copy_elsewhere_keeps_the_connection_open() {
    let (l, port) = listener_v4().await;
    let client = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let (mut peer, _) = within("accept", l.accept()).await.expect("accept");
    let other_copy = client.try_clone().expect("dup");
    drop(Socket::from_received(std::os::fd::OwnedFd::from(client)).expect("received"));
    let mut buf = [0u8; 8];
    let still_open = tokio::time::timeout(Duration::from_millis(200), peer.read(&mut buf)).await;
    assert!(still_open.is_err(), "no end while another copy is open");
    drop(other_copy);
    assert_eq!(within("end", peer.read(&mut buf)).await.expect("read"), 0);
}
