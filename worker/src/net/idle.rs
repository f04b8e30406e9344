//! The idle timer behind `socket.setTimeout(ms)` and the `'timeout'` event.
//!
//! A [`Socket`](super::Socket) stamps every read, write and connect into a shared
//! [`Activity`]; an [`IdleTimeout`] handle, which does not borrow the socket, waits until the
//! socket has been idle for the configured time. That lets one task select over reads and the
//! timeout at once, which a method borrowing the socket could not.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// Last activity and the idle timeout of one socket, shared with its [`IdleTimeout`] handles.
#[derive(Debug)]
pub(crate) struct Activity {
    base: Instant,
    /// Nanoseconds after `base` of the last read, write or connect.
    last: AtomicU64,
    /// The idle timeout in nanoseconds; 0 when disabled.
    timeout: AtomicU64,
    /// Wakes waiters when the timeout changes.
    changed: Notify,
}

impl Activity {
    pub(crate) fn new() -> Arc<Activity> {
        Arc::new(Activity {
            base: Instant::now(),
            last: AtomicU64::new(0),
            timeout: AtomicU64::new(0),
            changed: Notify::new(),
        })
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Records activity: the idle period starts again.
    pub(crate) fn touch(&self) {
        self.last.store(self.now_ns(), Ordering::Release);
    }

    /// Sets (`Some`) or disables (`None`) the idle timeout; the idle period starts now.
    pub(crate) fn set_timeout(&self, timeout: Option<Duration>) {
        let ns = timeout
            .map(|t| u64::try_from(t.as_nanos()).unwrap_or(u64::MAX).max(1))
            .unwrap_or(0);
        self.touch();
        self.timeout.store(ns, Ordering::Release);
        self.changed.notify_waiters();
    }

    pub(crate) fn timeout(&self) -> Option<Duration> {
        match self.timeout.load(Ordering::Acquire) {
            0 => None,
            ns => Some(Duration::from_nanos(ns)),
        }
    }
}

/// Waits for a socket's `'timeout'` events: obtained from
/// [`Socket::idle_timeout`](super::Socket::idle_timeout), independent of the socket's borrow.
///
/// [`IdleTimeout::expired`] completes once the socket has been idle (no bytes read or written)
/// for the time set with [`Socket::set_timeout`](super::Socket::set_timeout). As in Node, this
/// only notifies: the socket stays open, and the application decides whether to `end` or
/// `destroy` it. Each handle reports an idle period once; the next report needs new activity
/// followed by another full period. While no timeout is set (or it was set to zero), and after
/// the socket is destroyed or dropped, `expired` does not complete.
///
/// ```no_run
/// use std::time::Duration;
/// use netcluster_worker::net::Socket;
/// use tokio::io::AsyncReadExt;
///
/// # async fn f(mut socket: Socket) -> std::io::Result<()> {
/// socket.set_timeout(Duration::from_secs(3));
/// let idle = socket.idle_timeout();
/// let mut buf = [0u8; 1024];
/// loop {
///     tokio::select! {
///         n = socket.read(&mut buf) => if n? == 0 { break },
///         () = idle.expired() => {
///             println!("socket timeout");
///             socket.end(None).await?;
///         }
///     }
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct IdleTimeout {
    activity: Arc<Activity>,
    /// The activity stamp of the idle period this handle last reported.
    reported: AtomicU64,
}

impl Clone for IdleTimeout {
    fn clone(&self) -> Self {
        IdleTimeout {
            activity: self.activity.clone(),
            reported: AtomicU64::new(self.reported.load(Ordering::Acquire)),
        }
    }
}

impl IdleTimeout {
    pub(crate) fn new(activity: Arc<Activity>) -> IdleTimeout {
        IdleTimeout {
            activity,
            reported: AtomicU64::new(u64::MAX),
        }
    }

    /// The socket's idle timeout as currently set (`socket.timeout`), `None` when disabled.
    pub fn timeout(&self) -> Option<Duration> {
        self.activity.timeout()
    }

    /// Completes at the socket's next `'timeout'` event: when it has been idle for its timeout.
    ///
    /// # Cancel safety
    /// Cancel safe: an idle period counts as reported only in the poll that returns it, so
    /// dropping the future loses no event.
    pub async fn expired(&self) {
        let a = &self.activity;
        loop {
            let changed = a.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let Some(timeout) = a.timeout() else {
                changed.await;
                continue;
            };
            let last = a.last.load(Ordering::Acquire);
            let wake_at = if self.reported.load(Ordering::Acquire) == last {
                // This idle period was reported: look again after another period.
                Instant::now() + timeout
            } else {
                let deadline = a.base + Duration::from_nanos(last) + timeout;
                if Instant::now() >= deadline {
                    self.reported.store(last, Ordering::Release);
                    return;
                }
                deadline
            };
            tokio::select! {
                () = tokio::time::sleep_until(wake_at) => {}
                () = &mut changed => {}
            }
        }
    }
}
