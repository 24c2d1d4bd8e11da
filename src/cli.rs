//! The command line: one subcommand per role, each with its args and `run` in its own module.

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "imageindex", version, about = "Turn a bucket of images into a reverse-image-search service")]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Index a whole bucket or folder in one process: list, diff, delete, embed, upsert.
    Index(crate::sync::cli::IndexArgs),
    /// The embedding Job's work: the same sync, for one shard of the listing.
    Embed(crate::sync::cli::EmbedArgs),
    /// The search server: HTTP API and a web page.
    Serve(crate::serve::cli::ServeArgs),
    /// The operator: reconcile ImageIndex resources (in a cluster, or against a kubeconfig).
    Controller(crate::controller::cli::ControllerArgs),
    /// Print the ImageIndex CustomResourceDefinition (YAML), generated from the Rust types.
    Crd,
}

impl Args {
    /// Parses the command line and runs the command.
    pub async fn parse_and_run() -> Result<()> {
        crate::telemetry::init();
        crate::install_crypto();
        match Self::parse().command {
            Command::Index(args) => args.run().await,
            Command::Embed(args) => args.run().await,
            Command::Serve(args) => args.run().await,
            Command::Controller(args) => args.run().await,
            Command::Crd => {
                print!("{}", crate::crd::crd_yaml());
                Ok(())
            }
        }
    }

    /// Every environment variable some flag of some command reads.
    pub fn env_vars() -> std::collections::BTreeSet<String> {
        fn walk(cmd: &clap::Command, out: &mut std::collections::BTreeSet<String>) {
            out.extend(cmd.get_arguments().filter_map(|a| a.get_env()).map(|e| e.to_string_lossy().into_owned()));
            cmd.get_subcommands().for_each(|c| walk(c, out));
        }
        let mut out = std::collections::BTreeSet::new();
        walk(&<Self as clap::CommandFactory>::command(), &mut out);
        out
    }
}
