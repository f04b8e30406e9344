//! The echo server of Node's `net` docs (`net.createServer` example), in Rust.
//!
//! ```text
//! cargo run --example echo_server                 # listens on port 8124: telnet localhost 8124
//! cargo run --example echo_server /tmp/echo.sock  # a Unix socket:      nc -U /tmp/echo.sock
//! ```
//!
//! ```js
//! const server = net.createServer((c) => {
//!   console.log('client connected');
//!   c.on('end', () => console.log('client disconnected'));
//!   c.write('hello\r\n');
//!   c.pipe(c);
//! });
//! server.listen(8124, () => console.log('server bound'));
//! ```

use netcluster::net::{ListenOptions, Server};
use tokio::io::AsyncWriteExt;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("echo_server: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> std::io::Result<()> {
    let server = Server::new(|mut c| async move {
        println!("client connected");
        if c.write_all(b"hello\r\n").await.is_err() {
            return;
        }
        let (mut reader, mut writer) = tokio::io::split(c);
        let _ = tokio::io::copy(&mut reader, &mut writer).await; // c.pipe(c)
        println!("client disconnected"); // 'end'
        let _ = writer.shutdown().await;
    });
    let options = match std::env::args().nth(1) {
        Some(path) => ListenOptions::path(path),
        None => ListenOptions::port(8124),
    };
    let address = server.listen(options).await?;
    println!("server bound on {address}");
    // Stop on Ctrl-C: close the server (which removes a Unix socket file) and let the open
    // connections finish.
    tokio::signal::ctrl_c().await?;
    server.close()?;
    server.closed().await;
    Ok(())
}
