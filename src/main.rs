//! The imageindex binary: one program, a subcommand per role (see `cli`).

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    imageindex::cli::Args::parse_and_run().await
}
