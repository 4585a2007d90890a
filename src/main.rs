//! The `vmhost` binary: parses arguments and hands over to [`vmhost::server`].

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "vmhost", version, about = "Turns UCloud Jobs into libvirt/QEMU virtual machines")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Serve {
        /// TOML configuration; embedded defaults when omitted.
        #[arg(long, env = "VMHOST_CONFIG")]
        config: Option<PathBuf>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    vmhost::telemetry::init();
    match Cli::parse().command {
        Command::Serve { config } => {
            let config = match config {
                Some(path) => vmhost::config::Config::from_file(&path)?,
                None => vmhost::config::Config::default(),
            };
            vmhost::server::run(config).await
        }
    }
}
