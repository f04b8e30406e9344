//! The zero-overhead baseline of `benches/compare`: one process, one tokio runtime with N
//! worker threads, serving netcluster's built-in `echo` or `http` app on one listener — the
//! same application code as `netcluster serve` workers, without a primary or a cluster.
//!
//! ```text
//! cargo run --release --example tokio_baseline -- echo|http THREADS
//! ```
//!
//! Prints `listening on ADDRESS` (a free loopback port) and serves until killed.

use netcluster::apps::App;
use netcluster::net::ListenOptions;

fn main() -> std::process::ExitCode {
    let mut args = std::env::args().skip(1);
    let app: App = match args.next().as_deref().unwrap_or("echo").parse() {
        Ok(app) => app,
        Err(e) => {
            eprintln!("tokio_baseline: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let threads: usize = match args.next().map(|t| t.parse()) {
        None => 2,
        Some(Ok(n)) if n > 0 => n,
        Some(_) => {
            eprintln!("tokio_baseline: THREADS is a positive number");
            return std::process::ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tokio_baseline: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result: std::io::Result<()> = runtime.block_on(async move {
        let server = app.server(None);
        let options = ListenOptions::port(0).host("127.0.0.1");
        let address = server.listen(options).await?;
        println!("listening on {address}");
        std::future::pending::<()>().await;
        Ok(())
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tokio_baseline: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
