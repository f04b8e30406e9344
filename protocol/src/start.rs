//! What runs before `main` in every program that links netcluster: one constructor in
//! `.init_array` (what the `ctor` crate does, in a few lines), which
//!
//! 1. marks a worker's channel close-on-exec, so a program the worker starts before it first
//!    calls into the cluster API never inherits it; in a native worker, marks its listeners
//!    (`3 .. 3 + LISTEN_FDS`, right before the channel) close-on-exec too, so a program it
//!    starts (`sh -c`, a child per connection) never holds the port open after the worker and
//!    the primary are gone (the worker's own use of them is unchanged: the flag is the
//!    descriptor's, not the socket's);
//! 2. with [`env::LISTEN_PID_SELF`] set, sets `LISTEN_PID` to this
//!    process's own pid (libsystemd and the sd-notify crate ignore `LISTEN_FDS` otherwise, and
//!    a parent cannot know the pid before it forks);
//! 3. with [`env::EXEC`] set, acts as the **exec shim** of a program worker:
//!    closes every descriptor past its listeners (`3 .. 3 + LISTEN_FDS`), so nothing else of the
//!    primary's reaches the program, makes the listeners **blocking** (as systemd passes them:
//!    a plain accept loop, Python's `socket.socket(fileno=3)`, expects it; `O_NONBLOCK` is the
//!    socket's, shared with the primary's copy, which never accepts on a socket a program
//!    gets), and executes `argv[1..]` in place, keeping its pid (so the
//!    `LISTEN_PID` it set is the program's). A program that cannot be executed gets a message
//!    on stderr and exit code 127, as from a shell.
//!
//! 4. in a process that is not a netcluster worker, **takes the listeners systemd passed**
//!    (`LISTEN_FDS` with `LISTEN_PID` equal to its pid, named by `LISTEN_FDNAMES`, read with the
//!    `sd-notify` crate) and unsets the three variables, so that no thread or child of the
//!    process ever sees them; [`systemd_listeners`] hands them out once.
//!
//! Only environment the primary or systemd set triggers anything; in every other process the
//! constructor only reads a few variables.

#![allow(unsafe_code)]

use std::ffi::{CStr, CString, c_char, c_int};

use crate::env;

/// The constructor: see the module documentation.
extern "C" fn at_start(argc: c_int, argv: *const *const c_char, _envp: *const *const c_char) {
    crate::guardian::run_if_asked();
    crate::fd::cloexec_channel_at_start();
    crate::fd::cloexec_listeners_at_start();
    cloexec_upgrade_channel();
    take_systemd_listeners();
    let shim = std::env::var_os(env::EXEC).is_some_and(|v| v == "1");
    let own_pid = std::env::var_os(env::LISTEN_PID_SELF).is_some_and(|v| v == "1");
    if !shim && !own_pid {
        return;
    }
    let pid = std::process::id().to_string();
    let watchdog = shim && std::env::var_os("WATCHDOG_USEC").is_some();
    // SAFETY: before `main` the process has one thread, so nothing reads the environment
    // while it changes; the strings are NUL-terminated literals or CStrings that outlive the
    // calls.
    unsafe {
        let listen_pid = CString::new(pid).unwrap_or_default();
        libc::setenv(c"LISTEN_PID".as_ptr(), listen_pid.as_ptr(), 1);
        if watchdog {
            // A program worker with a watchdog: WATCHDOG_PID names it, as under systemd.
            libc::setenv(c"WATCHDOG_PID".as_ptr(), listen_pid.as_ptr(), 1);
        }
        unset(env::LISTEN_PID_SELF);
        unset(env::EXEC);
    }
    if !shim {
        return;
    }
    let keep = 3 + std::env::var(env::LISTEN_FDS)
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(0);
    close_from(keep);
    for fd in 3..keep {
        crate::fd::set_blocking_raw(i32::try_from(fd).unwrap_or(-1));
    }
    exec_rest(argc, argv);
}

/// What systemd passed this process, taken before `main`.
static SYSTEMD: std::sync::Mutex<Option<Vec<(i32, String)>>> = std::sync::Mutex::new(None);
/// The descriptor numbers systemd passed (whether or not they were taken since).
static SYSTEMD_NUMBERS: std::sync::OnceLock<Vec<i32>> = std::sync::OnceLock::new();

/// Before `main`, in a primary started by an upgrade: its end of the hand-over goes no further
/// than this process.
fn cloexec_upgrade_channel() {
    let Some(fd) = std::env::var(crate::handover::UPGRADE_FD_ENV)
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
    else {
        return;
    };
    if crate::fd::is_seqpacket(fd) {
        crate::fd::set_cloexec_raw(fd);
    }
}

/// The descriptor numbers systemd passed this process (its `LISTEN_FDS`), which are not the
/// process's to give workers by number.
pub fn systemd_fd_numbers() -> &'static [i32] {
    SYSTEMD_NUMBERS.get().map_or(&[], Vec::as_slice)
}

/// Before `main`, in a process that is not a netcluster worker: takes systemd's listeners and
/// unsets `LISTEN_FDS`, `LISTEN_PID` and `LISTEN_FDNAMES`.
fn take_systemd_listeners() {
    let worker = std::env::var_os(env::WORKER_ID).is_some()
        || std::env::var_os(env::CHANNEL_FD).is_some()
        || std::env::var_os(env::EXEC).is_some();
    if worker || std::env::var_os(env::LISTEN_FDS).is_none() {
        return;
    }
    // Only the listeners meant for this pid (the crate checks LISTEN_PID); they are made
    // close-on-exec.
    let taken: Vec<(i32, String)> = sd_notify::listen_fds_with_names()
        .map(Iterator::collect)
        .unwrap_or_default();
    // SAFETY: before `main` the process has one thread, so nothing reads the environment while
    // it changes.
    unsafe {
        unset(env::LISTEN_FDS);
        unset(env::LISTEN_PID);
        unset(env::LISTEN_FDNAMES);
    }
    let _ = SYSTEMD_NUMBERS.set(taken.iter().map(|(fd, _)| *fd).collect());
    if let Ok(mut stash) = SYSTEMD.lock() {
        *stash = Some(taken);
    }
}

/// The listeners systemd passed this process (socket activation, or its file-descriptor
/// store), with their names (`LISTEN_FDNAMES`; systemd's default is `unknown`), each owned
/// once: the first call takes them, later calls get none. Empty when systemd passed none, or
/// passed them for another pid.
pub fn systemd_listeners() -> Vec<(std::os::fd::OwnedFd, String)> {
    let taken = SYSTEMD
        .lock()
        .map(|mut s| s.take().unwrap_or_default())
        .unwrap_or_default();
    taken
        .into_iter()
        .filter_map(|(fd, name)| crate::fd::claim_inherited(fd).ok().map(|fd| (fd, name)))
        .collect()
}

/// Removes an environment variable.
///
/// # Safety
/// Only before `main` (one thread).
unsafe fn unset(name: &str) {
    if let Ok(name) = CString::new(name) {
        // SAFETY: the caller guarantees no other thread reads the environment.
        unsafe { libc::unsetenv(name.as_ptr()) };
    }
}

/// Closes every descriptor from `first` up.
fn close_from(first: u32) {
    // SAFETY: close_range only closes descriptors; the caller owns none above `first` (they
    // were inherited for nobody in this process).
    let rc = unsafe { libc::close_range(first, u32::MAX, 0) };
    if rc == 0 {
        return;
    }
    // Kernels before 5.9: close what /proc lists.
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<i32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd: &i32| u32::try_from(fd).is_ok_and(|f| f >= first))
        .collect();
    for fd in fds {
        // SAFETY: as above; a number that is already closed (the directory's own) gives EBADF.
        unsafe { libc::close(fd) };
    }
}

/// Executes `argv[1..]`, searching `PATH`; on failure writes why to stderr and exits 127.
fn exec_rest(argc: c_int, argv: *const *const c_char) -> ! {
    let args = arguments(argc, argv);
    let program = args.get(1).cloned();
    if let Some(program) = &program {
        let mut ptrs: Vec<*const c_char> = args[1..].iter().map(|a| a.as_ptr()).collect();
        ptrs.push(std::ptr::null());
        // SAFETY: `ptrs` is a NULL-terminated array of pointers to NUL-terminated strings
        // owned by `args`, alive across the call; execvp returns only on failure.
        unsafe { libc::execvp(program.as_ptr(), ptrs.as_ptr()) };
    }
    let err = std::io::Error::last_os_error();
    let name = program
        .as_deref()
        .map_or_else(|| "nothing".into(), |p| p.to_string_lossy().into_owned());
    let msg = format!("netcluster: cannot run {name}: {err}\n");
    // SAFETY: write(2) of a buffer we own; _exit ends the process without running anything
    // of the half-started program's.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
        libc::_exit(127)
    }
}

/// The process's arguments: from the constructor's parameters where the C library passes them
/// (glibc), else from `/proc/self/cmdline`.
fn arguments(argc: c_int, argv: *const *const c_char) -> Vec<CString> {
    if cfg!(target_env = "gnu") && !argv.is_null() && argc > 0 {
        let n = usize::try_from(argc).unwrap_or(0);
        return (0..n)
            .filter_map(|i| {
                // SAFETY: glibc passes main's argc/argv to init_array functions: `argv` holds
                // `argc` valid NUL-terminated strings.
                let p = unsafe { *argv.add(i) };
                (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_owned())
            })
            .collect();
    }
    std::fs::read("/proc/self/cmdline")
        .map(|raw| {
            raw.split(|&b| b == 0)
                .filter(|a| !a.is_empty())
                .filter_map(|a| CString::new(a).ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The constructor table entry. Referenced by [`installed`] so the linker keeps it.
#[used]
// SAFETY: the C runtime calls each `.init_array` entry once before `main`, with (argc, argv,
// envp) under glibc; `at_start` reads them only there and touches nothing but what its module
// documentation says.
#[unsafe(link_section = ".init_array")]
static AT_START: extern "C" fn(c_int, *const *const c_char, *const *const c_char) = at_start;

/// Whether the pre-`main` constructor is linked in (it always is on Linux; the function exists
/// so the table entry is referenced).
pub fn installed() -> bool {
    let f: extern "C" fn(c_int, *const *const c_char, *const *const c_char) = AT_START;
    f as usize != 0
}
