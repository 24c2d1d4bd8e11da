//! `imageindex generations`: the collections behind an index name, which one serves, and how
//! each build went.

use anyhow::Result;

use crate::config::BackendArgs;
use crate::index::Generations;

/// The flags of `imageindex generations`.
#[derive(clap::Args)]
pub struct GenerationsArgs {
    #[command(flatten)]
    backend: BackendArgs,
    /// Print them as JSON.
    #[arg(long)]
    json: bool,
}

impl GenerationsArgs {
    pub async fn run(self) -> Result<()> {
        let gens = Generations::connect(&self.backend.milvus()?, self.backend.mysql_url()?.expose()).await?;
        let all = gens.list().await?;
        if self.json {
            println!("{}", serde_json::to_string_pretty(&all)?);
            return Ok(());
        }
        if all.is_empty() {
            eprintln!("{} has no collection yet", gens.name());
        }
        let time =
            |t: Option<chrono::NaiveDateTime>| t.map_or("-".into(), |t| t.format("%Y-%m-%d %H:%M:%S").to_string());
        println!(
            "{:<4} {:<9} {:<32} {:<40} {:<19} {:<19}",
            "GEN", "STATE", "COLLECTION", "MODEL", "SERVING SINCE", "RETIRED"
        );
        for g in all {
            let state = if g.keep { format!("{:?} (kept)", g.state) } else { format!("{:?}", g.state) };
            println!(
                "{:<4} {:<9} {:<32} {:<40} {:<19} {:<19}",
                g.number,
                state.to_lowercase(),
                g.collection,
                g.model.as_deref().unwrap_or("-"),
                time(g.swapped_at),
                time(g.retired_at)
            );
            if let Some(reason) = g.reason {
                println!("     failed: {reason}");
            }
        }
        Ok(())
    }
}
