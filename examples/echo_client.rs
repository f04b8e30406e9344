//! The client of Node's `net` docs (`net.createConnection` example), in Rust: connect to the
//! echo server, write `world!\r\n`, print what comes back, end.
//!
//! ```text
//! cargo run --example echo_server &
//! cargo run --example echo_client                  # port 8124 on localhost
//! cargo run --example echo_client /tmp/echo.sock   # or a Unix socket
//! ```
//!
//! ```js
//! const client = net.createConnection({ port: 8124 }, () => {
//!   console.log('connected to server!');
//!   client.write('world!\r\n');
//! });
//! client.on('data', (data) => {
//!   console.log(data.toString());
//!   client.end();
//! });
//! client.on('end', () => {
//!   console.log('disconnected from server');
//! });
//! ```

use netcluster::net::{ConnectOptions, create_connection};
use tokio::io::AsyncReadExt;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("echo_client: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> std::io::Result<()> {
    let options = match std::env::args().nth(1) {
        Some(path) => ConnectOptions::from(std::path::PathBuf::from(path)),
        None => ConnectOptions::from(8124),
    };
    let mut client = create_connection(options).await?; // 'connect'
    println!("connected to server!");
    client.write(b"world!\r\n")?;
    let mut buf = vec![0u8; 64 * 1024];
    let n = client.read(&mut buf).await?; // 'data'
    println!("{}", String::from_utf8_lossy(&buf[..n]));
    client.end(None).await?;
    // Drain until the server ends its side too ('end').
    while client.read(&mut buf).await? > 0 {}
    println!("disconnected from server");
    Ok(())
}
