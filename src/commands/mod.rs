//! The data-plane commands, each the flags and the run of one subcommand: `index` and `embed`
//! (`index.rs`: the sync, on a terminal or in an embedding Job's pod), `generations` (an index's
//! collections), and the operator's short Jobs, `plan` and `cleanup`. They parse what they are
//! given, connect, and hand the work to `sync` and `index`; what a Job found goes back to the
//! operator as a `contract::report::Report` (written by `Out`).
//!
//! The plan and cleanup Jobs run in the ImageIndex's namespace with the credentials its pods get
//! (the controller holds none). Each writes a `Report` to `--report` (the pod's termination
//! message) and stdout, and exits 0 when it did its part, `contract::EXIT_CONFIG` when the spec
//! cannot work, 1 when a backend failed.

pub mod cleanup;
pub mod generations;
pub mod index;
pub mod plan;

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;

use crate::contract::env;
use crate::contract::report::{Report, Stop};
use crate::store;

#[derive(clap::Args)]
pub struct Out {
    /// Also write the report here (in a pod: its termination message, `/dev/termination-log`).
    #[arg(long, env = env::REPORT)]
    pub report: Option<PathBuf>,
    /// Seconds allowed for each Milvus and MySQL call.
    #[arg(long, env = env::IO_TIMEOUT, default_value_t = 30)]
    pub io_timeout: u64,
}

impl Out {
    pub fn limit(&self) -> Duration {
        Duration::from_secs(self.io_timeout)
    }

    /// Writes the report, and gives the exit status it implies.
    pub fn finish(&self, report: Report) -> Result<()> {
        let json = report.to_json();
        println!("{json}");
        if let Some(path) = &self.report {
            std::fs::write(path, &json)?;
        }
        match report {
            Report::Stopped { at, message } if at.is_config() => Err(Stopped(at, message).into()),
            Report::Stopped { at, message } => Err(anyhow::anyhow!("{at:?}: {message}")),
            _ => Ok(()),
        }
    }

    /// `f` within `--io-timeout`, its error as text for the report.
    pub async fn within<T>(&self, f: impl Future<Output = store::Result<T>>) -> Result<T, String> {
        let limit = self.limit();
        match tokio::time::timeout(limit, f).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no answer in {limit:?}")),
        }
    }
}

/// Where a Job stopped, and why. Where the spec cannot work (`Stop::is_config`), the command
/// exits `contract::EXIT_CONFIG`.
#[derive(Debug, thiserror::Error)]
#[error("{0:?}: {1}")]
pub struct Stopped(pub Stop, pub String);
