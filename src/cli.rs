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
    Index(crate::commands::index::IndexArgs),
    /// The collections behind an index name: which serves search, which is being built, which
    /// are retired (see `index --new-generation`).
    Generations(crate::commands::generations::GenerationsArgs),
    /// The embedding Job's work: the same sync, for one shard of the listing.
    Embed(crate::commands::index::EmbedArgs),
    /// An operator Job's first step: make or check the collection, diff the bucket against the
    /// catalog, and report what an embedding Job would have to do.
    Plan(crate::commands::plan::PlanArgs),
    /// An operator Job on deletion: drop the collection and its catalog rows, or let go of them.
    Cleanup(crate::commands::cleanup::CleanupArgs),
    /// The search server: HTTP API and a web page.
    Serve(crate::serve::cli::ServeArgs),
    /// The operator: reconcile ImageIndex resources (in a cluster, or against a kubeconfig).
    Controller(crate::controller::cli::ControllerArgs),
    /// Print the ImageIndex CustomResourceDefinition (YAML), generated from the Rust types.
    Crd,
}

use crate::contract::EXIT_CONFIG;

/// 78 for a configuration error anywhere in the chain (see `EXIT_CONFIG`), else 1.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    use crate::embed::ModelError;
    use crate::store::Error as Store;
    let config = e.chain().any(|c| {
        matches!(c.downcast_ref::<ModelError>(), Some(ModelError::Setup(_)))
            || matches!(
                c.downcast_ref::<Store>(),
                Some(Store::ModelMismatch(_) | Store::IndexMismatch(_) | Store::Claimed(_) | Store::Invalid(_))
            )
            || c.downcast_ref::<crate::commands::Stopped>().is_some_and(|s| s.0.is_config())
    });
    if config { EXIT_CONFIG } else { 1 }
}

impl Args {
    /// Parses the command line and runs the command.
    pub async fn parse_and_run() -> Result<()> {
        crate::telemetry::init();
        crate::install_crypto();
        match Self::parse().command {
            Command::Index(args) => args.run().await,
            Command::Embed(args) => args.run().await,
            Command::Generations(args) => args.run().await,
            Command::Plan(args) => args.run().await,
            Command::Cleanup(args) => args.run().await,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configuration_errors_exit_78_and_the_rest_1() {
        let setup = anyhow::Error::from(crate::embed::ModelError::Setup("model file /m.onnx does not exist".into()));
        assert_eq!(exit_code(&setup.context("loading the model")), EXIT_CONFIG);
        let mismatch = crate::store::Error::ModelMismatch(crate::core::ModelMismatch("holds fp32".into()));
        assert_eq!(exit_code(&anyhow::Error::from(mismatch).context("ensuring")), EXIT_CONFIG);
        let claimed = crate::store::Error::Claimed("belongs to another".into());
        assert_eq!(exit_code(&anyhow::Error::from(claimed)), EXIT_CONFIG);
        let down = crate::store::Error::backend("Milvus upsert", "connection refused");
        assert_eq!(exit_code(&anyhow::Error::from(down)), 1);
        assert_eq!(exit_code(&anyhow::anyhow!("anything else")), 1);
        use crate::commands::Stopped;
        use crate::contract::report::Stop;
        assert_eq!(exit_code(&Stopped(Stop::IndexMismatch, "HNSW".into()).into()), EXIT_CONFIG);
    }
}
