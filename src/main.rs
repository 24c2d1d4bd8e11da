//! The imageindex binary: one program, a subcommand per role (see `cli`).

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    match imageindex::cli::Args::parse_and_run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:?}");
            ExitCode::from(imageindex::cli::exit_code(&e))
        }
    }
}
