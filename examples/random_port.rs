//! Listen on a random port and print `server.address()`, as the `server.address()` example of
//! Node's `net` docs does.
//!
//! ```js
//! const server = net.createServer((socket) => {
//!   socket.end('goodbye\n');
//! });
//! server.listen(() => {
//!   console.log('opened server on', server.address());
//! });
//! ```

use netcluster::net::{ListenOptions, Server};
use tokio::io::AsyncWriteExt;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("random_port: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> std::io::Result<()> {
    let server = Server::new(|mut socket| async move {
        let _ = socket.write_all(b"goodbye\n").await; // socket.end('goodbye\n')
        let _ = socket.shutdown().await;
    });
    // listen() with no port: port 0, every interface; the OS picks the port.
    let address = server.listen(ListenOptions::port(0)).await?;
    println!("opened server on {}", address.to_node_string());
    tokio::signal::ctrl_c().await?;
    server.close()?;
    server.closed().await;
    Ok(())
}
