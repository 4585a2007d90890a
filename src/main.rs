//! The `vmhost` binary: parses arguments and hands over to [`vmhost::server`].

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "vmhost",
    version,
    about = "Turns UCloud Jobs into libvirt/QEMU virtual machines"
)]
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
    /// Print a job's serial console and updates as they happen.
    Console {
        /// The job id.
        job: String,
        /// vmhost's URL.
        #[arg(long, env = "VMHOST_URL", default_value = "http://127.0.0.1:8080")]
        url: String,
        /// Bearer token; defaults to the one vmhost generated in its data directory.
        #[arg(long, env = "VMHOST_TOKEN")]
        token: Option<String>,
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
        Command::Console { job, url, token } => {
            let token = match token {
                Some(token) => token,
                None => std::fs::read_to_string("/var/lib/vmhost/user-token")?
                    .trim()
                    .to_owned(),
            };
            vmhost::client::follow_console(&url, &token, &job).await
        }
    }
}
