//! Listen on an inherited descriptor, `server.listen({ fd: 3 })`: the seeds' echo server served
//! on a socket that systemd (or anything speaking its socket-activation protocol) opened.
//!
//! ```text
//! cargo build --example listen_fd
//! systemd-socket-activate -l 8124 target/debug/examples/listen_fd
//! telnet localhost 8124
//! ```

use netcluster::net::ListenOptions;

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const FIRST_FD: i32 = 3;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("listen_fd: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> std::io::Result<()> {
    // The seeds' echo server (see examples/echo_server.rs for it written out).
    let server = netcluster::apps::echo::server();
    let address = server.listen(ListenOptions::fd(FIRST_FD)).await?;
    println!("server bound on {address} (fd {FIRST_FD})");
    tokio::signal::ctrl_c().await?;
    server.close()?;
    server.closed().await;
    Ok(())
}
