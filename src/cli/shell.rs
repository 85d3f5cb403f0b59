//! Shell completions and manual pages, generated from the command line's own
//! definitions (clap_complete, clap_mangen), so they never drift from it.

use super::{Cli, CliError};
use clap::CommandFactory;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    shell: clap_complete::Shell,
}

#[derive(clap::Args, Debug)]
pub struct ManpagesArgs {
    /// Folder to write fvd.1 and fvd-COMMAND.1 into (created if missing).
    dir: PathBuf,
}

/// Prints the completion script for `a.shell` on stdout.
pub fn completions(a: CompletionsArgs) -> Result<i32, CliError> {
    let mut cmd = Cli::command();
    clap_complete::generate(a.shell, &mut cmd, "fvd", &mut std::io::stdout());
    Ok(0)
}

/// Writes one page for fvd and one per command; prints the paths written.
pub fn manpages(a: ManpagesArgs) -> Result<i32, CliError> {
    let dir_err = |e: std::io::Error| super::fail(format!("{}: {e}", a.dir.display()));
    std::fs::create_dir_all(&a.dir).map_err(dir_err)?;
    clap_mangen::generate_to(Cli::command(), &a.dir).map_err(dir_err)?;
    let mut pages: Vec<_> = std::fs::read_dir(&a.dir)
        .map_err(dir_err)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "1"))
        .collect();
    pages.sort();
    for p in pages {
        println!("{}", p.display());
    }
    Ok(0)
}
