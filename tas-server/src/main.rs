//! `tas-server --listen ADDR --state FILE [--tls-ca FILE --tls-cert FILE
//! --tls-key FILE]`: the arbiter process.
//!
//! Kept thin: load the state file, bind, announce the address on stdout
//! (`tas-server: listening on ADDR`, which tests and scripts wait for), then
//! serve. Every startup failure is one line on stderr and a non-zero exit.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tas_server::arbiter::{error_chain, Arbiter, OpenError};
use tas_server::tls::TlsFiles;
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

/// Duet's test-and-set arbiter: grants each (VM id, epoch) to exactly one
/// claimant, durably.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Address to listen on, e.g. 127.0.0.1:7700 (port 0 picks one).
    #[arg(long, value_name = "ADDR")]
    listen: SocketAddr,
    /// State file holding every decision (created if missing).
    #[arg(long, value_name = "FILE")]
    state: PathBuf,
    /// CA certificate (PEM) that every client's certificate must chain to.
    /// With --tls-cert and --tls-key: serve in mutual TLS, and grant a VM's
    /// claims only to certificates naming V.vm.duet. Without all three the
    /// arbiter is plaintext and open to anyone who reaches it.
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// The arbiter's certificate chain (PEM), naming arbiter.duet.
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// The arbiter's private key (PEM).
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error("cannot load state file")]
    State(#[from] OpenError),
    #[error("cannot set up TLS")]
    Tls(#[from] tas_server::tls::TlsError),
    #[error("cannot start the runtime")]
    Runtime(#[source] std::io::Error),
    #[error("cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = EnvFilter::try_from_env("TAS_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tas-server: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), StartError> {
    let tls = TlsFiles::from_flags(args.tls_ca, args.tls_cert, args.tls_key)?
        .map(|files| files.server_config())
        .transpose()?;
    let arbiter = Arbiter::open(&args.state)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(StartError::Runtime)?;
    runtime.block_on(async {
        let listener =
            TcpListener::bind(args.listen)
                .await
                .map_err(|source| StartError::Listen {
                    addr: args.listen,
                    source,
                })?;
        let local = listener.local_addr().unwrap_or(args.listen);
        println!("tas-server: listening on {local}");
        // Nobody reading stdout must not stop the server.
        let _ = std::io::stdout().flush();
        tracing::info!(%local, state = %args.state.display(), tls = tls.is_some(), "listening");
        if tls.is_none() {
            tracing::warn!(
                "no TLS (--tls-ca, --tls-cert, --tls-key): anyone who reaches {local} can claim \
                 any VM's pair and list every VM"
            );
        }
        tas_server::server::serve(listener, arbiter, tls).await;
        Ok(())
    })
}
